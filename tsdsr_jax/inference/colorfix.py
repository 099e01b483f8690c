"""The official inference's colour fixes of the SR output against the LR input: wavelet
(the default) and AdaIN.

All take ``(B, H, W, C)`` float images in [0, 1], compute in float32 and return clipped float32.
Given ``extent``s (B, 2), each image is its top-left (height, width) of a padded batch, and is
fixed as if alone (the padding's output is undefined).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.models.extent import region_mask

WAVELET_LEVELS = 5
ADAIN_EPS = 1e-5


Extent = jax.Array | None


def _mean_std(x: jax.Array, extent: Extent = None) -> tuple[jax.Array, jax.Array]:
    """Per-image, per-channel mean and ``sqrt(unbiased var + eps)`` over all pixels (or those
    inside ``extent``)."""
    if extent is None:
        mean = jnp.mean(x, axis=(-3, -2), keepdims=True)
        var = jnp.var(x, axis=(-3, -2), keepdims=True, ddof=1)
    else:
        mask = region_mask(extent, *x.shape[1:3]).astype(jnp.float32)
        count = mask.sum((1, 2), keepdims=True)
        mean = (mask * x).sum((1, 2), keepdims=True) / count
        var = (mask * jnp.square(x - mean)).sum((1, 2), keepdims=True) / (count - 1)
    return mean, jnp.sqrt(var + ADAIN_EPS)


def adain_color_fix(target: jax.Array, source: jax.Array, extent: Extent = None,
                    source_extent: Extent = None) -> jax.Array:
    """Gives ``target`` the per-channel mean and std of ``source`` (which may differ in size)."""
    target, source = target.astype(jnp.float32), source.astype(jnp.float32)
    mean_t, std_t = _mean_std(target, extent)
    mean_s, std_s = _mean_std(source, source_extent)
    return jnp.clip((target - mean_t) / std_t * std_s + mean_s, 0, 1)


def _blur_axis(x: jax.Array, radius: int, axis: int, length: jax.Array | None = None
               ) -> jax.Array:
    """[1, 2, 1] / 4 with dilation ``radius`` along ``axis``, edge-replicated at the array's end
    or at each image's ``length`` (B,).

    Replicate padding is a gather with clamped indices (faster to run and compile than jnp.pad).
    """
    i = np.arange(x.shape[axis])
    if length is None:
        taps = [jnp.take(x, np.clip(i + k * radius, 0, len(i) - 1), axis=axis) for k in (-1, 0, 1)]
    else:
        take = jax.vmap(lambda image, n, k: jnp.take(
            image, jnp.clip(i + k * radius, 0, n - 1), axis=axis), in_axes=(0, 0, None))
        taps = [take(x, length, k) for k in (-1, 0, 1)]
    return 0.25 * taps[0] + 0.5 * taps[1] + 0.25 * taps[2]


def wavelet_low(x: jax.Array, levels: int = WAVELET_LEVELS, extent: Extent = None) -> jax.Array:
    """The lowest band: ``levels`` successive dilated 3×3 blurs (separable), radius 2^i."""
    rows, cols = (None, None) if extent is None else (extent[:, 0], extent[:, 1])
    for i in range(levels):
        x = _blur_axis(_blur_axis(x, 2**i, -3, rows), 2**i, -2, cols)
    return x


def wavelet_color_fix(target: jax.Array, source: jax.Array, extent: Extent = None,
                      source_extent: Extent = None) -> jax.Array:
    """High frequencies of ``target`` plus the lowest band of ``source`` (same size).

    The official sum over the levels of ``image − blur(image)`` telescopes to
    ``target − low(target)``.
    """
    del source_extent  # the source has the target's size
    target, source = target.astype(jnp.float32), source.astype(jnp.float32)
    return jnp.clip(target - wavelet_low(target, extent=extent)
                    + wavelet_low(source, extent=extent), 0, 1)


def no_color_fix(target: jax.Array, source: jax.Array, extent: Extent = None,
                 source_extent: Extent = None) -> jax.Array:
    """Returns ``target`` as float32 (the official ``nofix``)."""
    del source, extent, source_extent
    return target.astype(jnp.float32)


ColorFix = Callable[[jax.Array, jax.Array, Extent, Extent], jax.Array]
COLOR_FIXES: dict[str, ColorFix] = {
    "wavelet": wavelet_color_fix,  # source: the LR upscaled to the target's size by PIL
    "adain": adain_color_fix,      # source: the LR at its own size
    "none": no_color_fix,
}
