"""What only a GPU would show, checked on the CPU where the logic allows: cuDNN attention on a
GPU too old for it, SD3's VAE under fp16 (diffusers' ``force_upcast``), non-finite outputs, a
variance rounded below zero, TF32 and true float32, and the base loaded to the host."""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import AutoencoderKL as TorchAutoencoderKL

from tsdsr_jax.inference import pipeline as pipeline_lib
from tsdsr_jax.inference.pipeline import InferenceConfig, Pipeline
from tsdsr_jax.io import model_dir
from tsdsr_jax.models import mmdit, set_matmul_precision, vae
from tsdsr_jax.training import loop, run_config, stages
from tsdsr_jax.training.run_config import ConfigError


def pretend_gpus(monkeypatch, *capabilities: str) -> None:
    devices = [types.SimpleNamespace(compute_capability=c) for c in capabilities]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "local_devices", lambda: devices)


@pytest.mark.parametrize("capability, want", [("9.0", "cudnn"), ("8.0", "cudnn"),
                                              ("7.0", "xla"), ("7.5", "xla")])
def test_cudnn_attention_falls_back_on_old_gpus(monkeypatch, capability, want):
    pretend_gpus(monkeypatch, "9.0", capability)
    impl, note = pipeline_lib.attention_impl(InferenceConfig())  # the default: cuDNN on a GPU
    assert impl == want
    assert (note is None) == (want == "cudnn")
    if note:
        assert note == (f"note: cuDNN's fused attention needs compute capability 8.0 or newer "
                        f"(this GPU: {capability}); XLA's attention instead, slower")
    assert mmdit.attention_here("cudnn")[0] == want  # the training config's default
    assert mmdit.attention_here(None) == (None, None)
    assert pipeline_lib.attention_impl(InferenceConfig(precision="fp32")) == (None, None)


def test_fp16_runs_sd3s_vae_in_fp32():
    # diffusers' own config of SD3's VAE says force_upcast: it is read, and honoured
    config = vae.VAEConfig.from_diffusers(dict(TorchAutoencoderKL(force_upcast=True).config))
    assert config.force_upcast
    assert config.compute_dtype(jnp.float16) == jnp.float32
    assert config.compute_dtype(jnp.bfloat16) == jnp.bfloat16
    model = model_dir.tiny()
    pipe = Pipeline(model, InferenceConfig(precision="fp16"))
    assert pipe.nets.mmdit.config.dtype == jnp.float16
    assert pipe.nets.vae.config.dtype == jnp.float32
    assert {a.dtype for a in jax.tree_util.tree_leaves(pipe.params["vae"])} == {np.dtype("float32")}
    plain = dataclasses.replace(model, vae_config=dataclasses.replace(model.vae_config,
                                                                      force_upcast=False))
    assert Pipeline(plain, InferenceConfig(precision="fp16")).nets.vae.config.dtype == jnp.float16
    # training: the same rule for the networks and the frozen VAE
    config = run_config.read(["--config", "configs/tiny.py", "--config.precision=fp16"])
    nets = stages.networks(model, config)
    assert nets.mmdit.config.dtype == jnp.float16 and nets.vae.config.dtype == jnp.float32


def test_non_finite_outputs_are_named_not_returned():
    model = model_dir.tiny()
    conv = model.params["vae"]["decoder"]["conv_out"]
    conv["kernel"] = jnp.full_like(conv["kernel"], jnp.nan)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    [[result]] = list(Pipeline(model, InferenceConfig(precision="fp32")).batches(
        [("photo", image)]))
    assert result.sr is None and result.problem.startswith("non-finite values in the output")


def test_group_norm_clamps_a_variance_rounded_below_zero():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 32)), jnp.float32)
    norm = vae.GroupNorm(num_groups=32)
    params = norm.init(jax.random.key(0), x)
    mean = jnp.zeros((1, 32))
    below = norm.apply(params, x, stats=(mean, jnp.full((1, 32), -1e-9)))
    zero = norm.apply(params, x, stats=(mean, jnp.zeros((1, 32))))
    assert np.isfinite(np.asarray(below)).all()
    np.testing.assert_array_equal(below, zero)


def test_matmul_precision_is_a_flag_and_a_config_value():
    try:
        set_matmul_precision("highest")
        assert jax.config.jax_default_matmul_precision == "highest"
        set_matmul_precision("default")
        assert jax.config.jax_default_matmul_precision is None
    finally:
        set_matmul_precision("default")
    assert run_config.read(["--config", "configs/tsd.py"]).matmul_precision == "default"
    with pytest.raises(ConfigError, match="config.matmul_precision='tf32': one of 'default', "
                                          "'highest'"):
        run_config.read(["--config", "configs/tsd.py", "--config.matmul_precision=tf32"])


def test_training_loads_the_base_to_the_host(release, tmp_path):
    """No device holds the whole frozen base before it is split over the mesh."""
    from tsdsr_jax.conversion.command import main as convert

    out = tmp_path / "model"
    assert convert(["--sd3", str(release.sd3), "--null-embeddings",
                    str(release.null_embeddings), "--out", str(out)]) == 0
    config = run_config.read(["--config", "configs/teacher.py", f"--config.model={out}"])
    model = loop.load_model(config)
    leaves = jax.tree_util.tree_leaves(model.params)
    assert leaves and all(isinstance(a, np.ndarray) for a in leaves)
    frozen = stages.frozen_inputs(config, model, None, None)
    assert all(isinstance(a, np.ndarray) for a in jax.tree_util.tree_leaves(frozen.base))
    want = model_dir.load(out)
    for a, b in zip(leaves, jax.tree_util.tree_leaves(want.params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
