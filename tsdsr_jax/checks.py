"""Checks of config values, shared by the config dataclasses: each names the field, the value
given and what is allowed, in one line (a ``ValueError``).

:func:`build` makes a dataclass from a mapping of config values (a section of a training
config, or flags): unknown and missing keys, types (from the annotations) and the dataclass's
own ``__post_init__`` checks, every message prefixed with the section's name.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from collections.abc import Mapping
from typing import Any

SEEDS = 2 ** 32  # seeds are in [0, SEEDS)


def in_range(obj: object, name: str, low: float | None = None, high: float | None = None,
             *, above: float | None = None, below: float | None = None) -> None:
    """``low <= obj.name <= high`` and ``above < obj.name < below`` (None: no bound; a value of
    None passes)."""
    value = getattr(obj, name)
    limits = [(sign, bound, test) for sign, bound, test in (
        (">=", low, operator.ge), ("<=", high, operator.le), (">", above, operator.gt),
        ("<", below, operator.lt)) if bound is not None]
    if value is not None and not all(test(value, bound) for _, bound, test in limits):
        raise ValueError(f"{name}={value!r}: must be "
                         + " and ".join(f"{sign} {bound}" for sign, bound, _ in limits))


def interval(obj: object, name: str, low: float | None = None, high: float | None = None
             ) -> None:
    """``obj.name`` is a pair ``(a, b)`` with ``low <= a <= b <= high`` (None: no bound)."""
    a, b = getattr(obj, name)
    if not (a <= b and (low is None or a >= low) and (high is None or b <= high)):
        within = "" if low is None and high is None else f" within [{low}, {high}]"
        raise ValueError(f"{name}={(a, b)!r}: must be (low, high) with low <= high{within}")


def probabilities(obj: object, name: str) -> None:
    """``obj.name`` is a tuple of probabilities that sum to 1."""
    values = getattr(obj, name)
    if any(not 0 <= v <= 1 for v in values) or not math.isclose(sum(values), 1, abs_tol=1e-6):
        raise ValueError(f"{name}={values!r}: must be probabilities in [0, 1] that sum to 1")


def one_of(obj: object, name: str, choices: tuple | list | Mapping) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: one of " + ", ".join(repr(c) for c in choices))


def _type_error(hint: Any, value: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None when it does)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        reasons = [_type_error(a, value) for a in args]
        return None if None in reasons else " or ".join(r for r in reasons if r)
    if hint is type(None):
        return None if value is None else "None"
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return "a tuple"
        items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args
        if len(items) != len(value):
            return f"a tuple of {len(items)}"
        bad = [r for a, v in zip(items, value) if (r := _type_error(a, v))]
        return f"a tuple of {bad[0]}" if bad else None
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok and math.isfinite(value) else "a finite number"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(hint, type) and not isinstance(value, hint):
        return {bool: "True or False", str: "a string"}.get(hint, hint.__name__)
    return None


def build(cls: type, values: Mapping[str, Any], section: str = ""):
    """``cls(**values)`` with every key, type and range checked, nested dataclasses from nested
    mappings; errors name ``section.key``."""
    prefix = f"{section}." if section else ""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{prefix}{key}: no such key; known: " + ", ".join(fields))
        if dataclasses.is_dataclass(hints[key]):  # a nested section
            if not isinstance(value, Mapping):
                raise ValueError(f"{prefix}{key}={value!r}: must be a section of "
                                 + ", ".join(f.name for f in dataclasses.fields(hints[key])))
            values[key] = build(hints[key], value, prefix + key)
        elif reason := _type_error(hints[key], value):
            raise ValueError(f"{prefix}{key}={value!r}: must be {reason}")
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{prefix}{missing[0]}: missing")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{prefix}{e}") from None
