"""Padded batches: images of several sizes in one array, each at the top left, its true
(height, width) its *extent*. The networks given extents compute on each image what they
compute on it alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def region_mask(extent: jax.Array, height: int, width: int) -> jax.Array:
    """(B, height, width, 1) bools: true inside each image's ``extent`` (B, 2) at the top left."""
    rows = jnp.arange(height)[None, :, None] < extent[:, 0, None, None]
    cols = jnp.arange(width)[None, None, :] < extent[:, 1, None, None]
    return (rows & cols)[..., None]


def zero_outside(x: jax.Array, extent: jax.Array | None) -> jax.Array:
    """``x`` (B, H, W, C) with zeros beyond each image's ``extent``: what a convolution's zero
    padding shows at the true image's edge. Unchanged when ``extent`` is None."""
    if extent is None:
        return x
    return jnp.where(region_mask(extent, *x.shape[1:3]), x, jnp.zeros((), x.dtype))


def masked_mean(x: jax.Array, extent: jax.Array) -> jax.Array:
    """Each image's mean (B, C) of ``x`` (B, H, W, C) over its ``extent``."""
    mask = region_mask(extent, *x.shape[1:3]).astype(jnp.float32)
    return (mask * x).sum((1, 2)) / mask.sum((1, 2))
