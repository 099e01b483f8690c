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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

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


def _resize_axis(x: jax.Array, out_size: int, axis: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size:  # PIL skips an axis whose size does not change
        return x
    first, weights = _coefficients(in_size, out_size)
    total = jnp.int32(1 << (PRECISION_BITS - 1))
    shape = [1] * x.ndim
    shape[axis] = out_size
    for k in range(weights.shape[1]):
        index = np.minimum(first + k, in_size - 1)
        total = total + jnp.take(x, index, axis=axis) * weights[:, k].reshape(shape)
    return jnp.clip(total >> PRECISION_BITS, 0, 255)


def pil_resize(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``Image.fromarray(im).resize((width, height))`` of each uint8 image of (..., H, W, C),
    to ``size = (height, width)``; uint8."""
    x = images.astype(jnp.int32)
    (height, width), (out_height, out_width) = images.shape[-3:-1], size
    if 0 < height - out_height and 2 * (width - out_width) < height - out_height:
        x = _resize_axis(_resize_axis(x, out_height, axis=-3), out_width, axis=-2)
    else:
        x = _resize_axis(_resize_axis(x, out_width, axis=-2), out_height, axis=-3)
    return x.astype(jnp.uint8)
