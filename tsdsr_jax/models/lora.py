"""LoRA-capable Dense and Conv layers, adapter initialisation and merging (peft semantics).

The frozen base weights live in the ``params`` collection. An adapter lives in its own ``lora``
collection, with the same module paths: ``{..., 'to_q': {'lora_A': (in, r), 'lora_B': (r, out)}}``
for a Dense and ``lora_A: (kh, kw, in, r)``, ``lora_B: (1, 1, r, out)`` for a Conv (A is a conv
with the base kernel, stride and padding; B is a 1x1 conv). A layer adds ``B(A x)`` whenever its
adapter is present, so one base serves any number of adapters::

    model.apply({'params': base, 'lora': student}, ...)
    model.apply({'params': base, 'lora': teacher}, ...)

peft scales the update by ``alpha / r``; adapters here carry that factor folded into ``lora_B``
(the official TSD-SR adapters use ``alpha = r``, a factor of 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsdsr_jax.io.tree import nest

Dtype = Any
PyTree = Any

LORA = "lora"


def _lora_delta(module: nn.Module, x: jax.Array, apply_a, apply_b) -> jax.Array | None:
    if not module.has_variable(LORA, "lora_A"):
        return None
    a = module.get_variable(LORA, "lora_A")
    b = module.get_variable(LORA, "lora_B")
    return apply_b(apply_a(x, a.astype(x.dtype)), b.astype(x.dtype))


class Dense(nn.Module):
    """``nn.Dense`` with an optional LoRA update read from the ``lora`` collection."""

    features: int
    use_bias: bool = True
    dtype: Dtype | None = None
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = x @ kernel.astype(dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
        delta = _lora_delta(self, x, lambda v, a: v @ a, lambda v, b: v @ b)
        return y if delta is None else y + delta


def _conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nn.Module):
    """A 2-D NHWC convolution (torch ``Conv2d`` semantics) with an optional LoRA update.

    ``padding`` is an int (symmetric, as torch) or explicit ``((top, bottom), (left, right))``.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: int | Sequence[tuple[int, int]] = 0
    use_bias: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, x.shape[-1], self.features))
        pad = self.padding
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = _conv(x, kernel.astype(dtype), self.strides, pad)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
        delta = _lora_delta(self, x,
                            lambda v, a: _conv(v, a, self.strides, pad),
                            lambda v, b: _conv(v, b, (1, 1), ((0, 0), (0, 0))))
        return y if delta is None else y + delta


# --------------------------------------------------------------------------- adapters


def _layers(tree: Mapping[str, Any], leaf: str) -> dict[str, Mapping[str, Any]]:
    """Every node of ``tree`` that holds ``leaf``, by dotted diffusers path."""
    found: dict[str, Mapping[str, Any]] = {}

    def walk(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        if leaf in node and not isinstance(node[leaf], Mapping):
            found[".".join(prefix)] = node
            return
        for key, child in node.items():
            if isinstance(child, Mapping):
                walk(child, prefix + (key,))

    walk(tree, ())
    return found


def layer_paths(params: PyTree) -> dict[str, Mapping[str, Any]]:
    """Every Dense/Conv of a params tree:
    ``{'transformer_blocks.0.attn.to_q': {'kernel': ...}}``."""
    return _layers(params, "kernel")


def adapter_layers(adapter: PyTree) -> dict[str, Mapping[str, Any]]:
    """Every adapted layer of an adapter tree, ``{path: {'lora_A': ..., 'lora_B': ...}}``."""
    return _layers(adapter, "lora_A")


def matches_target(path: str, targets: Sequence[str]) -> bool:
    """peft's ``target_modules`` rule: the full name, or a suffix after a dot."""
    return any(path == t or path.endswith("." + t) for t in targets)


def adapter_shapes(params: PyTree, targets: Sequence[str], rank: int
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{path: (shape of lora_A, shape of lora_B)}`` for every targeted layer of ``params``."""
    shapes = {}
    for path, node in layer_paths(params).items():
        if not matches_target(path, targets):
            continue
        kernel = node["kernel"].shape
        if len(kernel) == 2:
            shapes[path] = ((kernel[0], rank), (rank, kernel[1]))
        else:
            kh, kw, cin, cout = kernel
            shapes[path] = ((kh, kw, cin, rank), (1, 1, rank, cout))
    if not shapes:
        raise ValueError(f"LoRA targets {list(targets)} match no Dense/Conv layer")
    return shapes


def init_adapter(rng: jax.Array, params: PyTree, targets: Sequence[str], rank: int,
                 dtype: Dtype = jnp.float32) -> PyTree:
    """A fresh adapter as peft's ``init_lora_weights="gaussian"``: A ~ N(0, (1/r)^2), B = 0."""
    shapes = sorted(adapter_shapes(params, targets, rank).items())
    keys = jax.random.split(rng, len(shapes))
    return nest({path + ".lora_A": jax.random.normal(key, shape_a, dtype) / rank
                 for key, (path, (shape_a, _)) in zip(keys, shapes)}
                | {path + ".lora_B": jnp.zeros(shape_b, dtype) for path, (_, shape_b) in shapes})


def adapter_update(lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """The weight update ``B A`` in the base kernel's layout (Dense (in, out) or Conv HWIO)."""
    if lora_a.ndim == 2:
        return lora_a @ lora_b
    return jnp.einsum("hwir,ro->hwio", lora_a, lora_b[0, 0])


def merge(params: PyTree, adapter: PyTree) -> PyTree:
    """The base ``params`` with ``adapter`` folded into its kernels (for inference)."""
    base = layer_paths(params)
    updates = {}
    for path, node in adapter_layers(adapter).items():
        if path not in base:
            raise ValueError(f"adapter layer {path!r} is not a Dense/Conv of the base model")
        kernel = base[path]["kernel"]
        update = adapter_update(jnp.asarray(node["lora_A"], jnp.float32),
                                jnp.asarray(node["lora_B"], jnp.float32))
        updates[path + ".kernel"] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)

    def fold(path, leaf):
        return updates.get(".".join(p.key for p in path), leaf)

    return jax.tree_util.tree_map_with_path(fold, params)
