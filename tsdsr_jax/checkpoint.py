"""Training checkpoints with orbax: the train state and the data iterator's position.

Orbax writes each step into a temporary folder and renames it when complete, so a checkpoint
cut off mid-write is never taken for the latest; ``keep`` bounds how many stay on disk. A
finalized step that cannot be read (a truncated or deleted file, as a failing disk or a full
quota leaves it) is named and skipped for the newest older one that can.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(RuntimeError):
    """No checkpoint of a folder can be read."""


def _reason(error: Exception) -> str:
    """The first clause of a reader's error: which file, and what is wrong with it."""
    text = " ".join(str(error).split())
    return (text.split(" [")[0] or type(error).__name__)[:400]


class Checkpoints:
    """``save(step, state, data_state)`` and ``restore(like) -> (state, data_state)``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, create: bool = True):
        if not create and not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no checkpoints folder")
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, data_state: dict | None = None) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {})))
        self.manager.wait_until_finished()

    def restore(self, like: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """The state (shaped, typed and sharded like ``like``) and the data position of
        ``step``, or of the newest step that can be read."""
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"{self.manager.directory}: no checkpoint")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        failures = []
        for candidate in steps:
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            except Exception as e:  # a damaged step fails in whichever reader meets it
                failures.append(f"step {candidate}: {_reason(e)}")
                print(f"warning: {self.manager.directory}: checkpoint step {candidate} cannot "
                      f"be read ({_reason(e)})", file=sys.stderr)
                continue
            if failures:
                print(f"warning: restoring step {candidate} instead", file=sys.stderr)
            return restored.state, restored.data
        raise CheckpointError(f"{self.manager.directory}: no checkpoint can be read ("
                              + "; ".join(failures) + ")")

    def restore_raw(self, step: int | None = None) -> dict:
        """The saved state as plain nested dicts and lists of numpy arrays: no template, on any
        number of devices (whatever mesh saved it)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.manager.directory}: no checkpoint")
        saved = ocp.PyTreeCheckpointer().metadata(
            os.path.join(self.manager.directory, str(step), "state")).item_metadata.tree
        as_numpy = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(restore_args=as_numpy)))
        return restored.state

    def close(self) -> None:
        self.manager.close()
