"""Tensor names and layouts between PyTorch state dicts and our Flax parameter trees.

A Flax leaf ``a.b.kernel`` is the torch tensor ``a.b.weight`` (Linear (out, in) transposed,
Conv2d (out, in, kh, kw) as HWIO); ``scale`` is a norm's ``weight``; ``lora_A``/``lora_B`` are
peft's ``lora_A.weight``/``lora_B.weight`` in the same layouts as kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tsdsr_jax.io.safetensors import save_file

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}


class ConversionError(ValueError):
    """Tensors that do not fit the model: every problem, one per line."""


def torch_name(path: str) -> str:
    """The torch state-dict name of a dotted Flax leaf path."""
    module, _, leaf = path.rpartition(".")
    return f"{module}.{_TORCH_LEAF[leaf]}" if module else _TORCH_LEAF[leaf]


def _is_matrix(path: str) -> bool:
    return path.rpartition(".")[2] in ("kernel", "lora_A", "lora_B")


def to_flax(path: str, tensor: np.ndarray) -> np.ndarray:
    """A torch tensor in the layout of the Flax leaf ``path``."""
    if _is_matrix(path) and tensor.ndim == 2:
        return tensor.T
    if _is_matrix(path) and tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    return tensor


def to_torch(path: str, array: np.ndarray) -> np.ndarray:
    """A Flax leaf in torch's layout; the inverse of :func:`to_flax`."""
    if _is_matrix(path) and array.ndim == 2:
        return array.T
    if _is_matrix(path) and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax leaf of ``shape``."""
    return to_torch(path, np.empty(shape, dtype=np.bool_)).shape


def match(expected: Mapping[str, tuple[int, ...]], available: Mapping[str, tuple[int, ...]],
          source: str, prefix: str = "") -> dict[str, str]:
    """Pairs every expected Flax leaf with its tensor in ``available`` (named ``prefix + name``).

    Raises a :class:`ConversionError` naming every missing, misshapen and unexpected tensor.
    """
    pairs: dict[str, str] = {}
    problems: list[str] = []
    for path, shape in expected.items():
        name = prefix + torch_name(path)
        want = torch_shape(path, tuple(shape))
        if name not in available:
            problems.append(f"missing tensor {name} {want}")
        elif tuple(available[name]) != want:
            problems.append(f"tensor {name} has shape {tuple(available[name])}, expected {want}")
        else:
            pairs[path] = name
    used = set(pairs.values()) | {prefix + torch_name(p) for p in expected}
    problems += [f"unexpected tensor {name}" for name in sorted(set(available) - used)]
    if problems:
        raise ConversionError(f"{source}:\n  " + "\n  ".join(problems))
    return pairs


@dataclasses.dataclass
class OutputFile:
    """One safetensors file to write: tensor specs, and how to fetch each tensor when written."""

    name: str
    specs: dict[str, tuple[tuple[int, ...], np.dtype]]
    fetch: Callable[[str], np.ndarray]

    def write(self, folder: Path, metadata: Mapping[str, str] | None = None) -> None:
        save_file(folder / self.name, self.specs, self.fetch, metadata)


def plan_tree(name: str, expected: Mapping[str, Any], source: Mapping[str, np.ndarray],
              source_name: str, dtype: Any, prefix: str = "",
              keys: set[str] | None = None) -> OutputFile:
    """Checks ``source`` (torch names; only ``keys`` of it if given) against ``expected`` (flat
    Flax leaves with shapes) and returns the file of converted tensors, fetched one at a time
    from ``source`` when written."""
    pairs = match({p: tuple(v.shape) for p, v in expected.items()},
                  {k: tuple(source[k].shape) for k in (source if keys is None else keys)},
                  source_name, prefix)
    dtype = np.dtype(dtype)
    specs = {p: (tuple(v.shape), dtype) for p, v in expected.items()}
    return OutputFile(name, specs, lambda p: to_flax(p, np.asarray(source[pairs[p]])).astype(dtype))
