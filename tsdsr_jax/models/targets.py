"""Which layers TSD-SR's LoRA adapters adapt, as the official training script's peft
``target_modules`` lists."""

from __future__ import annotations

from typing import Any

from tsdsr_jax.models.lora import layer_paths

# The student's transformer adapter; the teacher adapter uses the same list.
STUDENT_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                   "add_v_proj", "proj", "linear", "proj_out")
# The online fake-score ("reg") adapter.
FAKE_SCORE_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                      "add_v_proj")


def vae_encoder_targets(vae_params: Any) -> tuple[str, ...]:
    """Every Dense/Conv of the VAE encoder (the official list: 31 layers of the SD3 VAE)."""
    return tuple(p for p in layer_paths(vae_params) if p.startswith("encoder."))
