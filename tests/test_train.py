"""`train.py` with configs/tiny.py on the bundled photos: losses fall, resume is exact."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import train
from configs import tiny
from tsdsr_jax import trainer
from tsdsr_jax.checkpoint import Checkpoints


@pytest.fixture(autouse=True, scope="module")
def compilation_cache(tmp_path_factory):
    """Runs of one config compile the same step: let the later ones reuse it."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jit")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


def run(workdir, total_steps, **overrides):
    config = tiny.get_config()
    config.unlock()
    config.workdir, config.total_steps = str(workdir), total_steps
    config.update(dict(log_every=1, validate_every=60, checkpoint_every=60, **overrides))
    train.train(config)
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_state(workdir):
    checkpoints = Checkpoints(workdir / "checkpoints")
    like = jax.tree_util.tree_map(np.asarray, checkpoints.manager.restore(
        checkpoints.latest_step()).state)
    checkpoints.close()
    return like


def thirds(metrics, key):
    """The mean of a loss over the first and the last third of a run (a smoothed trend)."""
    values = np.array([m[key] for m in metrics])
    third = len(values) // 3
    return values[:third].mean(), values[-third:].mean()


def test_losses_fall_and_resume_is_exact(tmp_path):
    straight = run(tmp_path / "straight", 120)
    for key in ("data_loss", "reg_loss"):
        first, last = thirds(straight, key)
        assert last < 0.8 * first, (key, first, last)
    # stop after step 60 (its checkpoint), then resume to 120
    run(tmp_path / "resumed", 60)
    resumed = run(tmp_path / "resumed", 120)
    assert [m["loss"] for m in resumed[60:]] == [m["loss"] for m in straight[60:]]
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
