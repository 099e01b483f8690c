"""Sampling with the SD3 transformer: diffusers' ``FlowMatchEulerDiscreteScheduler`` under
classifier-free guidance as SD3's pipelines use it, from pure noise or (``strength`` < 1) from a
noised latent, as image-to-image does. Used to look at what a teacher LoRA learnt.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.diffusion import schedule
from tsdsr_jax.diffusion.denoiser import Networks, Prompts, guided_velocity, velocity

PyTree = Any


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
        return schedule.euler_step(x, v, sigmas[k], sigmas[k + 1]), None

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
