"""The SD3 networks in Flax linen: the MMDiT transformer, the VAE, LPIPS, and LoRA layers."""

import jax.numpy as jnp

# Compute (and storage) precisions by name.
PRECISIONS = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
