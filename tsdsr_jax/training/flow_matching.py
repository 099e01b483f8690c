"""The teacher LoRA stage (SPEC §1): SD3's flow-matching loss on HR latents, and an Euler sampler.

The loss is the SD3 LoRA fine-tuning recipe of diffusers' training examples: an index drawn from
a timestep density (logit-normal by default) as ``floor(1000 u)``, ``x_σ = σ ε + (1 − σ) x_0``,
the prediction optionally preconditioned as in EDM (read as ``x̂_0 = x_σ − σ v`` against
``x_0``; otherwise ``v`` against ``ε − x_0``), a per-σ loss weighting, and the mean over
samples. On top of it, each caption is dropped to the null prompt with a set probability, so
that the teacher keeps its unconditional branch for classifier-free guidance.

The sampler is diffusers' ``FlowMatchEulerDiscreteScheduler`` with CFG as SD3's pipelines use
it: from pure noise, or (``strength`` < 1) from a noised latent, as image-to-image does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.diffusion import schedule
from tsdsr_jax.checks import in_range, one_of
from tsdsr_jax.training.tsd import Networks, Prompts, guided_velocity, velocity

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


def timestep_density(draw: jax.Array, config: FlowMatchingConfig) -> jax.Array:
    """``u`` in [0, 1] from the raw draw (diffusers' ``compute_density_for_timestep_sampling``)."""
    if config.weighting_scheme == "logit_normal":
        return jax.nn.sigmoid(draw)
    if config.weighting_scheme == "mode":
        return 1 - draw - config.mode_scale * (jnp.cos(np.pi * draw / 2) ** 2 - 1 + draw)
    return draw


def loss_weighting(sigma: jax.Array, config: FlowMatchingConfig) -> jax.Array:
    """The per-sample weight (diffusers' ``compute_loss_weighting_for_sd3``)."""
    if config.weighting_scheme == "sigma_sqrt":
        return sigma ** -2.0
    if config.weighting_scheme == "cosmap":
        return 2 / (np.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    return jnp.ones_like(sigma)


def flow_matching_loss(adapter: PyTree, nets: Networks, transformer: PyTree, latents: jax.Array,
                       prompts: Prompts, null: Prompts, noise: FlowNoise,
                       config: FlowMatchingConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The teacher's loss on clean latents ``E(x_H)·s`` (B, h, w, C) with their captions;
    differentiate w.r.t. ``adapter``. ``null`` is batched like ``prompts``."""
    n = schedule.NUM_TRAIN_TIMESTEPS
    u = timestep_density(noise.draw, config)
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
    weighting = loss_weighting(sigma, config).reshape(-1, 1, 1, 1)
    per_sample = jnp.mean(weighting * jnp.square(pred - target), axis=(1, 2, 3))
    return jnp.mean(per_sample), {"sigma": sigma, "per_sample": per_sample}


# --------------------------------------------------------------------------- the sampler


def sampler_sigmas(num_steps: int, shift: float = schedule.SHIFT) -> np.ndarray:
    """(N+1,) float32 σ of an N-step Euler run ending at 0, as
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)`` makes them (SD3: shift 3)."""
    n = schedule.NUM_TRAIN_TIMESTEPS
    train = schedule.sigmas(n, shift)
    s = np.linspace(float(train[0]) * n, float(train[-1]) * n, num_steps) / n
    s = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    return np.append(s, np.float32(0))


def euler_sample(nets: Networks, transformer: PyTree, adapter: PyTree | None, x: jax.Array,
                 sigmas: jax.Array, prompts: Prompts, null: Prompts, guidance_scale: float
                 ) -> jax.Array:
    """Runs the flow ODE from ``x`` at ``sigmas[0]`` down the given σ (CFG above scale 1)."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    b = x.shape[0]

    def step(x, k):
        t = jnp.full((b,), sigmas[k] * schedule.NUM_TRAIN_TIMESTEPS)
        if guidance_scale > 1:
            v = guided_velocity(nets, transformer, adapter, x, t, prompts, null, guidance_scale)
        else:
            v = velocity(nets, transformer, adapter, x, t, prompts)
        return x + (sigmas[k + 1] - sigmas[k]) * v, None

    x, _ = jax.lax.scan(step, x.astype(jnp.float32), jnp.arange(sigmas.shape[0] - 1))
    return x


def img2img_sigmas(num_steps: int, strength: float) -> np.ndarray:
    """The tail of the N-step σ that image-to-image runs at this ``strength`` (diffusers'
    ``t_start = N − min(N·strength, N)``); 1 keeps all of them."""
    start = int(max(num_steps - min(num_steps * strength, num_steps), 0))
    return sampler_sigmas(num_steps)[start:]


def denoise(nets: Networks, transformer: PyTree, adapter: PyTree | None, latents: jax.Array,
            noise: jax.Array, num_steps: int, strength: float, prompts: Prompts, null: Prompts,
            guidance_scale: float) -> jax.Array:
    """Noises clean latents to the σ where image-to-image starts at this ``strength`` (1: pure
    noise, i.e. generation) and runs the remaining Euler steps back to σ = 0."""
    sigmas = img2img_sigmas(num_steps, strength)
    x = schedule.add_noise(latents.astype(jnp.float32), noise, jnp.full((latents.shape[0],),
                                                                        sigmas[0]))
    return euler_sample(nets, transformer, adapter, x, sigmas, prompts, null, guidance_scale)
