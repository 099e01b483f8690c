"""The official inference's colour fixes of the SR output against the LR input: wavelet
(the default) and AdaIN.

All take ``(..., H, W, C)`` float images in [0, 1], compute in float32 and return clipped float32.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

WAVELET_LEVELS = 5
ADAIN_EPS = 1e-5


def _mean_std(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-image, per-channel mean and ``sqrt(unbiased var + eps)`` over all pixels."""
    mean = jnp.mean(x, axis=(-3, -2), keepdims=True)
    var = jnp.var(x, axis=(-3, -2), keepdims=True, ddof=1)
    return mean, jnp.sqrt(var + ADAIN_EPS)


def adain_color_fix(target: jax.Array, source: jax.Array) -> jax.Array:
    """Gives ``target`` the per-channel mean and std of ``source`` (which may differ in size)."""
    target, source = target.astype(jnp.float32), source.astype(jnp.float32)
    mean_t, std_t = _mean_std(target)
    mean_s, std_s = _mean_std(source)
    return jnp.clip((target - mean_t) / std_t * std_s + mean_s, 0, 1)


def _blur_axis(x: jax.Array, radius: int, axis: int) -> jax.Array:
    """[1, 2, 1] / 4 with dilation ``radius`` along ``axis``, edge-replicated.

    Replicate padding is a gather with clamped indices (faster to run and compile than jnp.pad).
    """
    i = np.arange(x.shape[axis])
    taps = [jnp.take(x, np.clip(i + k * radius, 0, len(i) - 1), axis=axis) for k in (-1, 0, 1)]
    return 0.25 * taps[0] + 0.5 * taps[1] + 0.25 * taps[2]


def wavelet_low(x: jax.Array, levels: int = WAVELET_LEVELS) -> jax.Array:
    """The lowest band: ``levels`` successive dilated 3×3 blurs (separable), radius 2^i."""
    for i in range(levels):
        x = _blur_axis(_blur_axis(x, 2**i, axis=-3), 2**i, axis=-2)
    return x


def wavelet_color_fix(target: jax.Array, source: jax.Array) -> jax.Array:
    """High frequencies of ``target`` plus the lowest band of ``source`` (same size).

    The official sum over the levels of ``image − blur(image)`` telescopes to
    ``target − low(target)``.
    """
    target, source = target.astype(jnp.float32), source.astype(jnp.float32)
    return jnp.clip(target - wavelet_low(target) + wavelet_low(source), 0, 1)


def no_color_fix(target: jax.Array, source: jax.Array) -> jax.Array:
    """Returns ``target`` as float32 (the official ``nofix``)."""
    del source
    return target.astype(jnp.float32)


COLOR_FIXES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "wavelet": wavelet_color_fix,  # source: the LR upscaled to the target's size by PIL
    "adain": adain_color_fix,      # source: the LR at its own size
    "none": no_color_fix,
}
