"""The teacher LoRA's objective: SD3's flow-matching loss on HR latents.

The loss is the SD3 LoRA fine-tuning recipe of diffusers' training examples: an index drawn from
a timestep density (logit-normal by default) as ``floor(1000 u)``, ``x_σ = σ ε + (1 − σ) x_0``,
the prediction optionally preconditioned as in EDM (read as ``x̂_0 = x_σ − σ v`` against
``x_0``; otherwise ``v`` against ``ε − x_0``), a per-σ loss weighting, and the mean over
samples. On top of it, each caption is dropped to the null prompt with a set probability, so
that the teacher keeps its unconditional branch for classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tsdsr_jax.checks import in_range, one_of
from tsdsr_jax.diffusion import schedule
from tsdsr_jax.diffusion.denoiser import Networks, Prompts, velocity

PyTree = Any
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
    """The SD3 flow-matching objective (diffusers' defaults) plus caption dropout.

    ``weighting_scheme`` picks both the timestep density (logit_normal, mode; uniform for the
    rest) and the loss weighting (sigma_sqrt, cosmap; one for the rest), as diffusers does."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True  # the loss on x̂_0 = x_σ − σ v (diffusers' default)
    caption_dropout: float = 0.1       # probability that a caption becomes the null prompt

    def __post_init__(self):
        one_of(self, "weighting_scheme", WEIGHTING_SCHEMES)
        in_range(self, "logit_std", above=0)
        in_range(self, "caption_dropout", 0, 1)


class FlowNoise(NamedTuple):
    """Every random draw of one step."""

    draw: jax.Array   # (B,) the timestep density's raw draw: N(mean, std) or U[0, 1)
    noise: jax.Array  # (B, h, w, C) ε
    drop: jax.Array   # (B,) bool: the caption is replaced by the null prompt


def sample_noise(rng: jax.Array, latent_shape: tuple[int, ...], config: FlowMatchingConfig
                 ) -> FlowNoise:
    k_draw, k_noise, k_drop = jax.random.split(rng, 3)
    b = latent_shape[0]
    if config.weighting_scheme == "logit_normal":
        draw = config.logit_mean + config.logit_std * jax.random.normal(k_draw, (b,))
    else:
        draw = jax.random.uniform(k_draw, (b,))
    return FlowNoise(draw, jax.random.normal(k_noise, latent_shape),
                     jax.random.bernoulli(k_drop, float(config.caption_dropout), (b,)))


def flow_matching_loss(adapter: PyTree, nets: Networks, transformer: PyTree, latents: jax.Array,
                       prompts: Prompts, null: Prompts, noise: FlowNoise,
                       config: FlowMatchingConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The teacher's loss on clean latents ``E(x_H)·s`` (B, h, w, C) with their captions;
    differentiate w.r.t. ``adapter``. ``null`` is batched like ``prompts``."""
    n = schedule.NUM_TRAIN_TIMESTEPS
    u = schedule.timestep_density(noise.draw, config.weighting_scheme, config.mode_scale)
    index = jnp.clip(jnp.floor(u * n).astype(jnp.int32), 0, n - 1)
    sigma = jnp.asarray(schedule.sigmas())[index]
    timestep = jnp.asarray(schedule.timesteps())[index]
    latents = latents.astype(jnp.float32)
    x = schedule.add_noise(latents, noise.noise, sigma)
    keep = lambda cond, empty: jnp.where(  # noqa: E731
        noise.drop.reshape((-1,) + (1,) * (cond.ndim - 1)), empty, cond)
    prompts = Prompts(keep(prompts.embeds, null.embeds), keep(prompts.pooled, null.pooled))
    v = velocity(nets, transformer, adapter, x, timestep, prompts)
    if config.precondition_outputs:
        pred, target = schedule.predict_x0(x, v, sigma), latents
    else:
        pred, target = v, noise.noise - latents
    weighting = schedule.loss_weighting(sigma, config.weighting_scheme).reshape(-1, 1, 1, 1)
    per_sample = jnp.mean(weighting * jnp.square(pred - target), axis=(1, 2, 3))
    return jnp.mean(per_sample), {"sigma": sigma, "per_sample": per_sample}
