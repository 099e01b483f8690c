"""`train.py` with configs/tiny.py on the bundled photos: losses fall, resume is exact; the
teacher stage (configs/tiny.py:teacher) learns, exports, samples and feeds TSD-SR."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig, set_peft_model_state_dict

from configs import tiny
from conftest import convert_release
from tsdsr_jax.conversion.export import main as export_main
from tsdsr_jax.conversion.torch_layout import to_flax
from tsdsr_jax.data.layout import DataError
from tsdsr_jax.diffusion.denoiser import Prompts
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.tree import flatten
from tsdsr_jax.models import lora
from tsdsr_jax.models.targets import STUDENT_TARGETS
from tsdsr_jax.training import flow_matching, loop, stages, steps
from tsdsr_jax.training.checkpoint import Checkpoints


@pytest.fixture(autouse=True, scope="module")
def compilation_cache(tmp_path_factory):
    """Runs of one config compile the same step: let the later ones reuse it."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jit")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


def run(workdir, total_steps, stage="tsd", **overrides):
    config = tiny.get_config(stage)
    config.unlock()
    config.workdir, config.total_steps = str(workdir), total_steps
    config.update(dict(log_every=1, validate_every=60, checkpoint_every=60, **overrides))
    loop.train(config)
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
    # stop after step 60 (its checkpoint), then resume to 120; the schedules' horizon stays 120
    horizon = {f"optim_{name}": {**tiny.get_config()[f"optim_{name}"], "total_steps": 120}
               for name in ("student", "fake_score")}
    run(tmp_path / "resumed", 60, **horizon)
    resumed = run(tmp_path / "resumed", 120)
    assert [m["loss"] for m in resumed[60:]] == [m["loss"] for m in straight[60:]]
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    check_export(tmp_path / "resumed" / "checkpoints", a["student"]["transformer"], tmp_path / "official",
                 {"transformer.safetensors", "vae.safetensors", "transformer_reg.safetensors"},
                 "transformer.safetensors")


def check_export(checkpoints, adapter, out, files, weight_name):
    """A trained transformer adapter exports to official files that diffusers + peft load
    exactly."""
    assert export_main(["--checkpoint", str(checkpoints), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == files
    cfg = model_dir.TINY_TRANSFORMER.to_dict()
    transformer = SD3Transformer2DModel(**{k: v for k, v in cfg.items() if k not in (
        "dtype", "attention_impl", "remat_policy")})
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(STUDENT_TARGETS)))
    official = StableDiffusion3Pipeline.lora_state_dict(out, weight_name=weight_name)
    result = set_peft_model_state_dict(
        transformer, {k.removeprefix("transformer."): v for k, v in official.items()})
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    trained = flatten(adapter)
    for path, value in trained.items():
        module = transformer.get_submodule(path.rsplit(".", 1)[0])
        got = getattr(module, path.rsplit(".", 1)[1])["default"].weight.detach().numpy()
        np.testing.assert_array_equal(to_flax(path, got), value)


# ------------------------------------------------------------------ the teacher stage


def held_out_loss(config, adapter) -> float:
    """The flow-matching loss of ``adapter`` on every training photo at eight fixed σ (fixed
    noise, no caption dropout): the training loss without its sampling noise."""
    model = loop.load_model(config)
    nets = stages.networks(model, config)
    flow = flow_matching.FlowMatchingConfig(caption_dropout=0.0)
    null = model.embeddings["null"]
    batches = loop.data_iterator(config, model)
    losses = []
    for i in range(3):  # the three photos of tests/data/train, in some order
        batch = next(batches)
        latents = steps.hr_latents(nets, model.params, jnp.asarray(batch["hr"]))
        latents = jnp.repeat(latents, 8, axis=0)
        noise = flow_matching.FlowNoise(jnp.linspace(-2.5, 2.5, 8),
                                  jax.random.normal(jax.random.key(i), latents.shape),
                                  jnp.zeros(8, bool))
        prompts = Prompts(*(jnp.repeat(jnp.asarray(batch[k]), 8, axis=0)
                                for k in ("prompt_embeds", "pooled_prompt_embeds")))
        empty = Prompts(*(jnp.broadcast_to(jnp.asarray(null[k]), (8, *null[k].shape))
                              for k in ("prompt_embeds", "pooled_prompt_embeds")))
        loss, _ = flow_matching.flow_matching_loss(adapter, nets, model.params["transformer"],
                                                   latents, prompts, empty, noise, flow)
        losses.append(float(loss))
    return float(np.mean(losses))


def test_teacher_stage_learns_samples_exports_and_teaches(tmp_path):
    config = tiny.get_config("teacher")
    metrics = run(tmp_path / "teacher", 120, stage="teacher")
    assert len(metrics) == 120 and not any(m["skipped"] for m in metrics)
    state = final_state(tmp_path / "teacher")
    start = lora.init_adapter(jax.random.key(0), model_dir.tiny().params["transformer"],
                              STUDENT_TARGETS, config.teacher_rank)  # B = 0: the plain base
    before, after = held_out_loss(config, start), held_out_loss(config, state["teacher"])
    print(f"teacher: held-out flow-matching loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "teacher" / "validation" / "step_0000060.png").is_file()

    # the sampler: deterministic for a seed, another seed gives another sample
    model = loop.load_model(config)
    nets = stages.networks(model, config)
    frozen = steps.Frozen(model.params, None, None, Prompts(
        *(jnp.asarray(model.embeddings["null"][k]) for k in ("prompt_embeds",
                                                            "pooled_prompt_embeds"))), None)
    batch = {k: jnp.asarray(v) for k, v in next(loop.data_iterator(config, model)).items()}
    teacher_state = steps.TeacherState(*(state[k] for k in steps.TeacherState._fields))
    sample = lambda seed: np.asarray(jax.jit(functools.partial(  # noqa: E731
        stages.teacher_validation_image, nets, seed=seed, **config.sample))(
            teacher_state, frozen, batch))
    first = sample(0)
    assert first.shape == (64, 4 * 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, sample(0))
    assert np.abs(first[:, 192:] - sample(1)[:, 192:]).max() > 1e-3

    # the official file, and the TSD stage reading the run directly
    checkpoints = tmp_path / "teacher" / "checkpoints"
    check_export(checkpoints, state["teacher"], tmp_path / "official", {"teacher.safetensors"},
                 "teacher.safetensors")
    tsd_config = tiny_config(teacher=str(checkpoints))
    loaded = loop.load_teacher(tsd_config, model_dir.tiny())
    for path, value in flatten(state["teacher"]).items():
        np.testing.assert_array_equal(flatten(loaded)[path], value)


def test_teacher_that_is_not_a_teacher_run_is_refused(tmp_path):
    with pytest.raises(loop.ConfigError, match="teacher run's checkpoints folder"):
        loop.load_teacher(tiny_config(teacher=str(tmp_path / "nothing")), model_dir.tiny())
    checkpoints = Checkpoints(tmp_path / "tsd")
    checkpoints.save(1, {"student": {"a": np.zeros(2)}})
    checkpoints.close()
    with pytest.raises(loop.ConfigError, match="not a teacher run"):
        loop.load_teacher(tiny_config(teacher=str(tmp_path / "tsd")), model_dir.tiny())
    checkpoints = Checkpoints(tmp_path / "other")
    checkpoints.save(1, {"teacher": {"proj": {"lora_A": np.zeros((2, 4))}}})
    checkpoints.close()
    with pytest.raises(loop.ConfigError,
                       match=r"does not fit tiny: missing pos_embed\.proj\.lora_A"):
        loop.load_teacher(tiny_config(teacher=str(tmp_path / "other")), model_dir.tiny())


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
    with pytest.raises(loop.ConfigError, match=needle):
        loop.train(config)


def test_teacher_stage_needs_the_null_prompt(release, tmp_path):
    model = convert_release(release, tmp_path / "model", "embeddings")
    config = tiny.get_config("teacher")
    config.unlock()
    config.update(dict(model=str(model), workdir=str(tmp_path / "run")))
    with pytest.raises(loop.ConfigError, match="null-prompt embeddings"):
        loop.train(config)


def test_dataset_that_does_not_match_is_refused(tmp_path):
    (tmp_path / "data" / "gt").mkdir(parents=True)
    (tmp_path / "data" / "gt" / "a.png").write_bytes(b"")
    config = tiny_config(workdir=str(tmp_path / "run"))
    config.data.roots = (str(tmp_path / "data"),)
    with pytest.raises(DataError, match="prompt_embeds/a"):
        loop.train(config)
