"""SD3's flow-matching schedule: sigmas and timesteps by index, noising, Euler steps, and the
densities and loss weightings that SD3's training draws timesteps with.

Index ``i = 0 … N-1`` runs from pure noise (σ = 1, t = 1000) towards the data; the values equal
diffusers' ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)`` in float32
(SD3: N = 1000, shift 3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 3.0


def sigmas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = SHIFT) -> np.ndarray:
    """σ_i for every index, float32, shape (num_train_timesteps,)."""
    n = num_train_timesteps
    u = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    shift = np.float32(shift)
    return (shift * u / (np.float32(1) + (shift - np.float32(1)) * u)).astype(np.float32)


def timesteps(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = SHIFT) -> np.ndarray:
    """The timestep fed to the model at every index: ``t_i = N σ_i``, float32."""
    return (sigmas(num_train_timesteps, shift) * np.float32(num_train_timesteps)).astype(np.float32)


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """``x_σ = σ ε + (1 − σ) x_0``; ``sigma`` broadcasts from the batch axis."""
    sigma = _per_sample(sigma, x0)
    return sigma * noise + (1 - sigma) * x0


def predict_x0(x: jax.Array, v: jax.Array, sigma: jax.Array) -> jax.Array:
    """The clean sample implied by a velocity ``v ≈ ε − x_0``: ``x_0 = x_σ − σ v``."""
    return x - _per_sample(sigma, x) * v


def euler_step(x: jax.Array, v: jax.Array, sigma_from: jax.Array, sigma_to: jax.Array
               ) -> jax.Array:
    """One Euler step of the flow ODE from σ_a to σ_b: ``x − (σ_a − σ_b) v``."""
    return x - _per_sample(sigma_from - sigma_to, x) * v


def timestep_density(draw: jax.Array, scheme: str, mode_scale: float = 1.29) -> jax.Array:
    """``u`` in [0, 1] from a raw draw, N(mean, std) for ``logit_normal`` and U[0, 1) otherwise
    (diffusers' ``compute_density_for_timestep_sampling``; uniform for other schemes)."""
    if scheme == "logit_normal":
        return jax.nn.sigmoid(draw)
    if scheme == "mode":
        return 1 - draw - mode_scale * (jnp.cos(np.pi * draw / 2) ** 2 - 1 + draw)
    return draw


def loss_weighting(sigma: jax.Array, scheme: str) -> jax.Array:
    """The per-sample loss weight (diffusers' ``compute_loss_weighting_for_sd3``: σ⁻² for
    ``sigma_sqrt``, the cosine map for ``cosmap``, else 1)."""
    if scheme == "sigma_sqrt":
        return sigma ** -2.0
    if scheme == "cosmap":
        return 2 / (np.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    return jnp.ones_like(sigma)


def _per_sample(value: jax.Array, like: jax.Array) -> jax.Array:
    value = jnp.asarray(value, like.dtype)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))
