"""PIL's default ``Image.resize`` (bicubic) of uint8 RGB images, bit for bit, on the device.

The official inference resizes with PIL twice: the wavelet colour fix's source is the LR image
upscaled by PIL, and an output made at a larger size is brought back to ×upscale by PIL. Doing
it here keeps the whole of inference in one jitted call (uint8 in, uint8 out).

PIL's 8-bit resampling (Pillow's ``Resample.c``): per axis, the bicubic filter (a = −0.5,
stretched by the scale when shrinking) gives each output pixel a window of input pixels and
float64 weights normalised to sum to one; the weights become integers in 22-bit fixed point,
and the output is ``clip((Σ pixel · weight + 2²¹) >> 22, 0, 255)``. The first pass's result
is rounded to uint8 before the second: the horizontal pass first, unless the height shrinks by
more than twice as many pixels as the width (Pillow ≥ 13's order). The weights are built here
in numpy, in the same float64 operations and order; the sums are exact int32 arithmetic.
:func:`pil_taps` and :func:`resize_with_taps` give the tables per image, for images of several
sizes padded into one batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.inference.resize import apply_taps

_A = -0.5              # PIL's bicubic filter
_SUPPORT = 2.0
PRECISION_BITS = 22    # 32 bits less 8 for the pixel and 2 for the filter's overshoot


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each output pixel's first input pixel (out,) and fixed-point weights (out, taps) int32;
    taps past an output's window weigh 0."""
    scale = float(in_size) / out_size
    filter_scale = max(scale, 1.0)
    support = _SUPPORT * filter_scale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) truncates toward zero, as astype does
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    weights = _bicubic((offsets + first[:, None] - center[:, None] + 0.5) * (1.0 / filter_scale))
    weights = np.where(offsets < count[:, None], weights, 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # summed in PIL's order
        total = total + weights[:, k]
    weights = np.where(total[:, None] != 0, weights / np.where(total == 0, 1, total)[:, None],
                       weights)
    fixed = weights * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(weights < 0, fixed - 0.5, fixed + 0.5)).astype(np.int32)
    return first, fixed


def pil_taps(in_size: int, out_size: int, taps: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """One axis's input pixel indices and fixed-point weights, both (out_size, taps) int32
    (``taps`` at least the filter's: zero weights pad it). An unchanged size (which PIL skips)
    is the identity."""
    if in_size == out_size:
        first, weights = np.arange(out_size), np.full((out_size, 1), 1 << PRECISION_BITS)
    else:
        first, weights = _coefficients(in_size, out_size)
    taps = taps or weights.shape[1]
    if taps < weights.shape[1]:
        raise ValueError(f"{in_size} -> {out_size} needs {weights.shape[1]} taps, not {taps}")
    weights = np.pad(weights, ((0, 0), (0, taps - weights.shape[1])))
    index = np.minimum(first[:, None] + np.arange(taps), in_size - 1)
    return index.astype(np.int32), weights.astype(np.int32)


def vertical_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether PIL (≥ 13) resizes ``in_size`` to ``out_size`` (height, width) rows first."""
    (height, width), (out_height, out_width) = in_size, out_size
    return 0 < height - out_height and 2 * (width - out_width) < height - out_height


def _resize_axis(x: jax.Array, index: np.ndarray | jax.Array, weights: np.ndarray | jax.Array,
                 axis: int) -> jax.Array:
    total = jnp.int32(1 << (PRECISION_BITS - 1)) + apply_taps(x, index, weights, axis)
    return jnp.clip(total >> PRECISION_BITS, 0, 255)


def resize_with_taps(images: jax.Array, rows: tuple[jax.Array, jax.Array],
                     cols: tuple[jax.Array, jax.Array], rows_first: bool) -> jax.Array:
    """uint8 images (..., H, W, C) resized with :func:`pil_taps` tables for the rows and the
    columns, (out, taps) or per image (B, out, taps), in PIL's order of passes; uint8."""
    x = images.astype(jnp.int32)
    if rows_first:
        x = _resize_axis(_resize_axis(x, *rows, axis=-3), *cols, axis=-2)
    else:
        x = _resize_axis(_resize_axis(x, *cols, axis=-2), *rows, axis=-3)
    return x.astype(jnp.uint8)


def pil_resize(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``Image.fromarray(im).resize((width, height))`` of each uint8 image of (..., H, W, C),
    to ``size = (height, width)``; uint8."""
    (height, width), (out_height, out_width) = images.shape[-3:-1], size
    if (height, width) == size:
        return images
    return resize_with_taps(images, pil_taps(height, out_height), pil_taps(width, out_width),
                            vertical_first((height, width), size))
