"""Shared fixtures: tiny SD3 checkpoints written by diffusers and peft in the real formats."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

# Compile with LLVM's optimisations off: the same arithmetic, a third less compile time, and the
# suite is mostly compiles. Read when the backend starts; subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict

from tsdsr_jax.conversion.torch_layout import to_flax

jax.config.update("jax_default_matmul_precision", "highest")

STUDENT_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                   "proj", "linear", "proj_out"]

TINY_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                        caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                        pos_embed_max_size=64)
TINY_SD35 = TINY_TRANSFORMER | dict(qk_norm="rms_norm", dual_attention_layers=(0,))
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                layers_per_block=1, latent_channels=4, norm_num_groups=4, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
PROMPT_LEN = 7


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> Path:
    """A persistent compilation cache for the tests' subprocesses, shared by the xdist workers
    of this run: a program that one test compiled, the next one loads."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "jax-cache"
    path.mkdir(exist_ok=True)
    return path


def jitter(module: torch.nn.Module, std: float = 0.05) -> None:
    """Adds noise to every parameter, so that zero-initialised layers are exercised too."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def vae_encoder_targets(vae: AutoencoderKL) -> list[str]:
    """Every Linear/Conv2d of the VAE encoder, as the official script lists them."""
    return [n for n, m in vae.named_modules()
            if n.startswith("encoder.") and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def add_lora(model, targets, rank, name, seed):
    """Injects a peft adapter with random non-zero B and returns its state dict."""
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=targets), adapter_name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}" in n:
                p.normal_(std=0.05)
    return get_peft_model_state_dict(model, adapter_name=name)


@dataclasses.dataclass
class Release:
    """What a TSD-SR user has on disk, plus the torch models it was made from."""

    sd3: Path
    lora: Path
    teacher: Path
    embeddings: Path
    null_embeddings: Path
    transformer: SD3Transformer2DModel  # adapters "default" (student) and "teacher"
    vae: AutoencoderKL                  # adapter "default" (student encoder)
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor


def save_embeddings(folder: Path, prompt: torch.Tensor, pooled: torch.Tensor) -> None:
    folder.mkdir(parents=True)
    torch.save(prompt, folder / "prompt_embeds.pt")
    torch.save(pooled, folder / "pool_embeds.pt")


def make_release(root: Path, transformer_config: dict) -> Release:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**transformer_config).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    jitter(transformer)
    jitter(vae)
    # The base, sharded like the real SD3 checkpoint.
    transformer.save_pretrained(root / "sd3" / "transformer", max_shard_size="50KB")
    vae.save_pretrained(root / "sd3" / "vae")
    student = add_lora(transformer, STUDENT_TARGETS, 4, "default", 1)
    student_vae = add_lora(vae, vae_encoder_targets(vae), 4, "default", 2)
    teacher = add_lora(transformer, STUDENT_TARGETS, 4, "teacher", 3)
    transformer.set_adapter("default")
    for name, layers in (("transformer", student), ("vae", student_vae)):
        StableDiffusion3Pipeline.save_lora_weights(root / "lora", transformer_lora_layers=layers,
                                                   weight_name=f"{name}.safetensors")
    StableDiffusion3Pipeline.save_lora_weights(root / "teacher", transformer_lora_layers=teacher,
                                               weight_name="teacher.safetensors")
    dim, pooled = transformer_config["joint_attention_dim"], transformer_config["pooled_projection_dim"]
    prompt, pool = torch.randn(1, PROMPT_LEN, dim), torch.randn(1, pooled)
    save_embeddings(root / "default", prompt, pool)
    save_embeddings(root / "null", torch.randn(1, PROMPT_LEN, dim), torch.randn(1, pooled))
    return Release(root / "sd3", root / "lora", root / "teacher" / "teacher.safetensors",
                   root / "default", root / "null", transformer, vae, prompt, pool)


def convert_release(release: Release, out: Path, *inputs: str) -> Path:
    """Runs `python -m convert` (fp32) on the release's SD3 folder and the named ``inputs``
    (lora, teacher, embeddings, null); returns the model directory."""
    from convert.__main__ import main as convert_main

    flags = {"lora": ("--lora", release.lora), "teacher": ("--teacher-lora", release.teacher),
             "embeddings": ("--embeddings", release.embeddings),
             "null": ("--null-embeddings", release.null_embeddings)}
    argv = ["--sd3", str(release.sd3), "--out", str(out), "--dtype", "fp32"]
    for name in inputs:
        argv += [flags[name][0], str(flags[name][1])]
    assert convert_main(argv) == 0
    return out


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> Release:
    """A tiny SD3 folder, official-format student/teacher LoRA files and prompt embeddings."""
    return make_release(tmp_path_factory.mktemp("release"), TINY_TRANSFORMER)


@pytest.fixture(scope="session")
def release_sd35(tmp_path_factory) -> Release:
    """The same, for an SD3.5-style transformer (RMS qk-norm, a dual-attention block)."""
    return make_release(tmp_path_factory.mktemp("release35"), TINY_SD35)


def peft_grads(model: torch.nn.Module, adapter: str) -> dict[str, np.ndarray]:
    """The gradients on one peft adapter's LoRA weights, keyed by our leaf path, in our layout."""
    suffix = f".{adapter}.weight"
    return {name.removesuffix(suffix): to_flax(name.removesuffix(suffix), p.grad.numpy())
            for name, p in model.named_parameters()
            if "lora_" in name and name.endswith(suffix) and p.grad is not None}


def rel_err(got, want) -> float:
    """The largest absolute difference over the largest magnitude of the reference."""
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))
