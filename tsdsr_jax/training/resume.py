"""A run's config on disk: ``WORKDIR/config.json`` is the config of the latest run, and a resume
that changes it keeps the one before as ``config.before_<step>.json``.

On a resume every changed value is said (``key: old -> new``); a change that the saved state
cannot follow (the stage, the model, the resolution, a LoRA rank) is refused before anything
loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from tsdsr_jax.training.run_config import ConfigError

CONFIG = "config.json"
# what a checkpoint's state is shaped by: a resume cannot change it
FIXED = ("stage", "model", "data.resolution", "student_rank", "student_vae_rank",
         "fake_score_rank", "teacher_rank")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def saved_step(workdir: Path) -> int | None:
    """The newest checkpointed step in ``workdir`` (None: a new run)."""
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=None)


def changes(workdir: Path, config: ml_collections.ConfigDict) -> list[str]:
    """``key: old -> new`` for every value that differs from the saved run's config (none for a
    new run); raises :class:`ConfigError` for a change that the saved state cannot follow."""
    step = saved_step(workdir)
    try:
        old = _flat(json.loads((workdir / CONFIG).read_text()))
    except (FileNotFoundError, ValueError):  # a new run, or no readable record of the old one
        return []
    if step is None:
        return []
    new = _flat(json.loads(config.to_json_best_effort()))
    changed = [(k, old.get(k, "(absent)"), new.get(k, "(absent)")) for k in sorted(old | new)
               if old.get(k) != new.get(k)]
    fixed = [f"{k}: {a!r} -> {b!r}" for k, a, b in changed if k in FIXED]
    if fixed:
        raise ConfigError(f"{workdir}: cannot resume step {step} with "
                          + "; ".join(fixed) + " (the checkpoint was trained with the old "
                          "value): keep it, or give another --config.workdir")
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in changed]


def write(workdir: Path, config: ml_collections.ConfigDict, changed: bool) -> None:
    """Writes ``config.json`` (then renames it into place); when ``changed``, the previous one
    is kept as ``config.before_<step>.json``."""
    path = workdir / CONFIG
    if changed:
        os.replace(path, workdir / f"config.before_{saved_step(workdir)}.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)
