"""LPIPS (Zhang et al. 2018, the ``lpips`` package's version 0.1) on AlexNet or VGG16 features.

Parameter names are torch's: the backbone convs are torchvision's ``features.{i}`` (AlexNet
``features.0`` ... ``features.10``, VGG16 ``features.0`` ... ``features.28``), the linear heads
the ``lpips`` package's ``lin{k}.model.1``; kernels HWIO. Inputs are NHWC images in [0, 1]::

    d = lpips(params, sr, hr)  # (B,) distances, differentiable, jittable, any float dtype

Given ``extent`` (B, 2), images of several sizes share the batch (each at the top left,
:mod:`tsdsr_jax.models.extent`) and each gets its distance alone.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsdsr_jax.models.extent import masked_mean, zero_outside
from tsdsr_jax.models.lora import Conv

Dtype = Any
PyTree = Any

NETS = ("alex", "vgg")
# The lpips package's ScalingLayer: ImageNet statistics of inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Per backbone: (torchvision ``features`` index, out channels, kernel, stride, padding) of each
# conv; the convs whose ReLU output is a tapped layer; the convs preceded by a max-pool; its
# (size, stride).
_VGG_CONVS = ((0, 64), (2, 64), (5, 128), (7, 128), (10, 256), (12, 256), (14, 256), (17, 512),
              (19, 512), (21, 512), (24, 512), (26, 512), (28, 512))
LAYERS = {
    "alex": (((0, 64, 11, 4, 2), (3, 192, 5, 1, 2), (6, 384, 3, 1, 1), (8, 256, 3, 1, 1),
              (10, 256, 3, 1, 1)), (0, 3, 6, 8, 10), (3, 6), (3, 2)),
    "vgg": (tuple((i, c, 3, 1, 1) for i, c in _VGG_CONVS), (2, 7, 14, 21, 28), (5, 10, 17, 24),
            (2, 2)),
}


def _max_pool(x: jax.Array, size: int, stride: int) -> jax.Array:
    """torch ``MaxPool2d(size, stride)``: no padding, floor mode."""
    return nn.max_pool(x, (size, size), (stride, stride), padding="VALID")


def _unit(f: jax.Array) -> jax.Array:
    """``f / (|f|_channels + 1e-10)`` as lpips' ``normalize_tensor``, with a finite gradient
    where a feature vector is all zero."""
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    pos = sq > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    return f / (norm + 1e-10)


class Head(nn.Module):
    """lpips' ``NetLinLayer``: a 1x1 conv to one channel without bias (``model.1``)."""

    @nn.compact
    def __call__(self, d: jax.Array) -> jax.Array:
        return Conv(1, (1, 1), use_bias=False, name="model.1")(d)


class LPIPS(nn.Module):
    """``lpips.LPIPS(net, version='0.1')(x, y, normalize=True)`` for NHWC ``x, y`` in [0, 1].

    ``dtype`` is the backbone's compute dtype; normalisation and distances are float32.
    """

    net: str = "alex"
    dtype: Dtype | None = None

    def features(self, x: jax.Array, extent: jax.Array | None = None
                 ) -> list[tuple[jax.Array, jax.Array | None]]:
        """The tapped layers, each with its extent (None without one)."""
        convs, taps, pooled, pool = LAYERS[self.net]
        out = []
        x = zero_outside(x, extent)
        for index, features, kernel, stride, padding in convs:
            if index in pooled:
                x = _max_pool(x, *pool)
                if extent is not None:
                    extent = (extent - pool[0]) // pool[1] + 1
                    x = zero_outside(x, extent)
            x = nn.relu(Conv(features, (kernel, kernel), (stride, stride), padding,
                             dtype=self.dtype, name=f"features.{index}")(x))
            if extent is not None:
                extent = (extent + 2 * padding - kernel) // stride + 1
                x = zero_outside(x, extent)
            if index in taps:
                out.append((x, extent))
        return out

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, extent: jax.Array | None = None
                 ) -> jax.Array:
        shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
        both = (jnp.concatenate([x, y]).astype(jnp.float32) * 2 - 1 - shift) / scale
        both_extent = None if extent is None else jnp.concatenate([extent, extent])
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for k, (f, f_extent) in enumerate(
                self.features(both.astype(self.dtype or x.dtype), both_extent)):
            f = _unit(f.astype(jnp.float32))
            fx, fy = jnp.split(f, 2)
            head = Head(name=f"lin{k}")(jnp.square(fx - fy))
            if f_extent is None:
                total = total + jnp.mean(head, axis=(1, 2, 3))
            else:
                total = total + masked_mean(head, f_extent[:x.shape[0]])[:, 0]
        return total


def net_of(params: PyTree) -> str:
    """Which backbone a parameter tree holds."""
    return "vgg" if "features.28" in params else "alex"


def lpips(params: PyTree, x: jax.Array, y: jax.Array, dtype: Dtype | None = None,
          extent: jax.Array | None = None) -> jax.Array:
    """LPIPS distances ``(B,)`` between NHWC images ``x`` and ``y`` in [0, 1] (each of its own
    ``extent`` in a padded batch, if given)."""
    return LPIPS(net_of(params), dtype).apply({"params": params}, x, y, extent)


def init_params(rng: jax.Array, net: str) -> PyTree:
    """Random float32 parameters (for shapes and tests; real ones come from ``convert``)."""
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    return LPIPS(net).init(rng, x, x)["params"]


def abstract_params(net: str) -> PyTree:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    return jax.eval_shape(functools.partial(init_params, net=net), jax.random.key(0))
