"""The SD3 networks in Flax linen: the MMDiT transformer, the VAE, LPIPS, and LoRA layers."""

import jax
import jax.numpy as jnp

# Compute (and storage) precisions by name.
PRECISIONS = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}

# How float32 matmuls and convolutions run: "default" is XLA's (TF32 on Ampere and Hopper GPUs,
# 10 mantissa bits), "highest" true float32 (several times slower there).
MATMUL_PRECISIONS = ("default", "highest")


def set_matmul_precision(name: str) -> None:
    """Applies one of :data:`MATMUL_PRECISIONS` to every computation compiled from now on."""
    jax.config.update("jax_default_matmul_precision", None if name == "default" else name)
