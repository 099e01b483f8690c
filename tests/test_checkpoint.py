"""Checkpoints: a train state and the data position round-trip; a cut-off write is ignored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tsdsr_jax.training import optim, steps
from tsdsr_jax.training.checkpoint import CheckpointError, Checkpoints


def make_state(seed: int) -> steps.TrainState:
    rng = np.random.default_rng(seed)
    student = ({"transformer_blocks.0": {"attn": {"to_out.0": {
        "lora_A": jnp.asarray(rng.standard_normal((8, 2)), jnp.float32),
        "lora_B": jnp.asarray(rng.standard_normal((2, 8)), jnp.float32)}}}},
               {"encoder": {"conv_in": {"lora_A": jnp.asarray(rng.standard_normal((3, 3, 3, 2)),
                                                              jnp.float32),
                                        "lora_B": jnp.zeros((1, 1, 2, 4))}}})
    fake = {"transformer_blocks.0": {"attn": {"to_q": {"lora_A": jnp.ones((8, 2)),
                                                       "lora_B": jnp.zeros((2, 8))}}}}
    opt = optim.optimizer(optim.OptimConfig(learning_rate=1e-4, total_steps=100))
    state = steps.TrainState(jnp.asarray(seed, jnp.int32), student, fake, opt.init(student),
                               opt.init(fake), jnp.asarray([seed, 0], jnp.int32),
                               jax.random.PRNGKey(seed))
    grads = jax.tree_util.tree_map(jnp.ones_like, student)  # one update: non-trivial moments
    updates, opt_state = opt.update(grads, state.opt_student, student)
    return state._replace(student=optax.apply_updates(student, updates), opt_student=opt_state)


def assert_same(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keep_last_and_cut_off_write(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoints.save(step, make_state(step), {"epoch": 0, "position": step * 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]
    # a save that died mid-write leaves orbax's temporary folder: it is not a checkpoint
    (tmp_path / "4.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "4.orbax-checkpoint-tmp-1234" / "state").write_bytes(b"\0" * 10)
    checkpoints.close()
    reopened = Checkpoints(tmp_path, keep=2)
    assert reopened.latest_step() == 3
    state, data = reopened.restore(make_state(0))
    assert_same(state, make_state(3))
    assert data == {"epoch": 0, "position": 6}
    state, _ = reopened.restore(make_state(0), step=2)
    assert_same(state, make_state(2))


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoints_fall_back_to_the_newest_readable(tmp_path, capsys):
    checkpoints = Checkpoints(tmp_path, keep=3)
    for step in (1, 2, 3):
        checkpoints.save(step, make_state(step), {"position": step})
    checkpoints.close()
    manifest = tmp_path / "3" / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:20])           # truncated
    (tmp_path / "2" / "data" / "metadata").unlink()           # deleted
    reopened = Checkpoints(tmp_path, keep=3)
    state, data = reopened.restore(make_state(0))
    assert_same(state, make_state(1))
    assert data == {"position": 1}
    err = capsys.readouterr().err
    assert "step 3 cannot be read" in err and "manifest.ocdbt" in err
    assert "step 2 cannot be read" in err and "metadata" in err
    assert "restoring step 1 instead" in err
    assert "Traceback" not in err
    raw = reopened.restore_raw()  # the same fallback without a template
    np.testing.assert_array_equal(raw["step"], 1)
    with pytest.raises(CheckpointError, match="no checkpoint of step 7 .steps: 1, 2, 3"):
        reopened.restore_raw(step=7)
    # a flipped byte, the size unchanged
    largest = max((p for p in (tmp_path / "1").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 1
    largest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="no checkpoint can be read.*step 1: .*CRC-32"):
        reopened.restore(make_state(0))
