"""Bicubic resizing with PyTorch's semantics, as the official inference upsamples the LR input.

``resize_bicubic`` equals torch's
``F.interpolate(mode="bicubic", align_corners=False, antialias=False)``: cubic convolution with
a = −0.75, source coordinate ``(dst + 0.5) · in/out − 0.5`` in float32, tap indices clamped to the
edge. ``jax.image.resize(method="cubic")`` uses a = −0.5 and differs.

Each axis is one 1-D pass of four gathers with fixed indices and weights (built in numpy at trace
time) summed in torch's order: O(4·pixels) work, tiny constants, and no matmul whose precision
could drop to TF32 on GPUs. The tables can also be given per image (:func:`apply_taps`), so that
images of several sizes, padded into one batch, are each resized as alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_A = np.float32(-0.75)
_ONE = np.float32(1)


def _cubic1(x: np.ndarray) -> np.ndarray:
    """Kernel for |x| ≤ 1."""
    return ((_A + 2) * x - (_A + 3)) * x * x + _ONE


def _cubic2(x: np.ndarray) -> np.ndarray:
    """Kernel for 1 < |x| < 2."""
    return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A


def cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Torch's source indices (int32) and float32 weights for one axis, both (out_size, 4)."""
    scale = np.float32(in_size) / np.float32(out_size)
    centre = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # float32 with one rounding: torch's kernels are built with FMA contraction (AVX2, CUDA), so
    # ``scale * centre - 0.5`` is a fused multiply-add; float64 emulates it (the product is exact).
    src = (np.float64(scale) * centre.astype(np.float64) - 0.5).astype(np.float32)
    start = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - start.astype(np.float32), np.float32(0), _ONE)
    u = _ONE - t
    weights = np.stack([_cubic2(t + _ONE), _cubic1(t), _cubic1(u), _cubic2(u + _ONE)], axis=1)
    index = np.clip(start[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return index.astype(np.int32), weights.astype(np.float32)


def take_taps(x: jax.Array, index: np.ndarray | jax.Array, axis: int) -> jax.Array:
    """``x`` (B, ...) gathered along ``axis`` (negative) at ``index``: (out,) for every image, or
    (B, out) per image."""
    if index.ndim == 1:
        return jnp.take(x, index, axis=axis)
    return jax.vmap(lambda image, i: jnp.take(image, i, axis=axis))(x, index)


def apply_taps(x: jax.Array, index: np.ndarray | jax.Array, weights: np.ndarray | jax.Array,
               axis: int) -> jax.Array:
    """``Σ_j x[index[:, j]] · weights[:, j]`` along ``axis`` (negative), in torch's order; the
    tables are (out, taps) for every image or (B, out, taps) per image."""
    total = None
    after = (1,) * (-axis - 1)
    for j in range(index.shape[-1]):
        w = weights[..., j]
        if w.ndim == 1:
            w = w.reshape(w.shape + after)
        else:  # (B, out): image b's weights along its own axis
            w = w.reshape((w.shape[0],) + (1,) * (x.ndim - 1 + axis) + w.shape[1:] + after)
        tap = take_taps(x, index[..., j], axis) * w
        total = tap if total is None else total + tap
    return total


def _resize_axis(x: jax.Array, out_size: int, axis: int) -> jax.Array:
    """One 1-D bicubic pass along ``axis`` (a negative axis)."""
    in_size = x.shape[axis]
    if in_size == out_size:  # torch's weights are then exactly (0, 1, 0, 0)
        return x
    return apply_taps(x, *cubic_taps(in_size, out_size), axis)


def resize_bicubic(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes ``(..., H, W, C)`` images to ``size = (height, width)`` like torch's bicubic.

    Up- and downsampling (without antialiasing); computed in float32 (or wider) and returned in
    ``x``'s dtype. Under ``jax.jit``, ``size`` must be static.
    """
    height, width = size
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    y = _resize_axis(x.astype(dtype), width, axis=-2)
    return _resize_axis(y, height, axis=-3).astype(x.dtype)
