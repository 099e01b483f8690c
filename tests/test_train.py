"""`train.py` with configs/tiny.py on the bundled photos: losses fall, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig, set_peft_model_state_dict

import train
from configs import tiny
from conftest import convert_release
from convert.export import main as export_main
from convert.layout import to_flax
from tsdsr_jax import model_dir
from tsdsr_jax.adapters import STUDENT_TARGETS
from tsdsr_jax.checkpoint import Checkpoints
from tsdsr_jax.data.layout import DataError
from tsdsr_jax.tree import flatten


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
    check_export(tmp_path / "resumed" / "checkpoints", a, tmp_path / "official")


def check_export(checkpoints, state, out):
    """The trained student exports to official files that diffusers + peft load exactly."""
    assert export_main(["--checkpoint", str(checkpoints), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"transformer.safetensors", "vae.safetensors",
                                               "transformer_reg.safetensors"}
    cfg = model_dir.TINY_TRANSFORMER.to_dict()
    transformer = SD3Transformer2DModel(**{k: v for k, v in cfg.items() if k not in (
        "dtype", "attention_impl", "remat_policy")})
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(STUDENT_TARGETS)))
    official = StableDiffusion3Pipeline.lora_state_dict(out, weight_name="transformer.safetensors")
    result = set_peft_model_state_dict(
        transformer, {k.removeprefix("transformer."): v for k, v in official.items()})
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    trained = flatten(state["student"][0])
    for path, value in trained.items():
        module = transformer.get_submodule(path.rsplit(".", 1)[0])
        got = getattr(module, path.rsplit(".", 1)[1])["default"].weight.detach().numpy()
        np.testing.assert_array_equal(to_flax(path, got), value)


# ------------------------------------------------------------------ errors before compiling


def tiny_config(**overrides):
    config = tiny.get_config()
    config.unlock()
    config.update(overrides)
    return config


def test_wrong_config_key_is_refused(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py",
                           "--config.learning_rat=1", f"--config.workdir={tmp_path}"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode != 0 and "learning_rat" in proc.stderr


@pytest.fixture(scope="module")
def incomplete_model(release, tmp_path_factory):
    """A model directory with embeddings but neither LPIPS nor a teacher."""
    return convert_release(release, tmp_path_factory.mktemp("incomplete") / "model",
                           "embeddings", "null")


@pytest.mark.parametrize("teacher,needle", [("lora", "no teacher LoRA"), ("sd3", "LPIPS")])
def test_incomplete_model_is_refused(incomplete_model, tmp_path, teacher, needle):
    config = tiny_config(model=str(incomplete_model), teacher=teacher, workdir=str(tmp_path))
    with pytest.raises(train.ConfigError, match=needle):
        train.train(config)


def test_dataset_that_does_not_match_is_refused(tmp_path):
    (tmp_path / "data" / "gt").mkdir(parents=True)
    (tmp_path / "data" / "gt" / "a.png").write_bytes(b"")
    config = tiny_config(workdir=str(tmp_path / "run"))
    config.data.roots = (str(tmp_path / "data"),)
    with pytest.raises(DataError, match="prompt_embeds/a"):
        train.train(config)
