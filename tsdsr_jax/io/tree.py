"""Parameter trees keyed by diffusers names.

Our module names are diffusers' module names, with a list index kept with its list
(``'transformer_blocks.0'``, ``'to_out.0'``), so a leaf's dotted path is the diffusers name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def split_path(path: str) -> list[str]:
    """A dotted diffusers path as tree keys:
    ``'blocks.0.attn.to_out.0'`` -> ``['blocks.0', 'attn', 'to_out.0']``."""
    keys: list[str] = []
    for part in path.split("."):
        if part.isdigit() and keys:
            keys[-1] = f"{keys[-1]}.{part}"
        else:
            keys.append(part)
    return keys


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b.0': {'c': x}}}`` -> ``{'a.b.0.c': x}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def nest(flat: Mapping[str, Any]) -> dict:
    """``{'a.b.0.c': x}`` -> ``{'a': {'b.0': {'c': x}}}``; the inverse of :func:`flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = split_path(path)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def shape_problems(shapes: Mapping[str, tuple[int, ...]],
                   expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What keeps flat ``shapes`` from matching ``expected``: missing and unexpected names, and
    names of another shape (empty when they match)."""
    problems = [f"missing {k}" for k in expected if k not in shapes]
    problems += [f"unexpected {k}" for k in shapes if k not in expected]
    problems += [f"{k} has shape {tuple(shapes[k])}, expected {tuple(v)}"
                 for k, v in expected.items() if k in shapes and tuple(shapes[k]) != tuple(v)]
    return problems
