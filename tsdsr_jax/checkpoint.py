"""Training checkpoints with orbax: the train state and the data iterator's position.

Orbax writes each step into a temporary folder and renames it when complete, so a checkpoint
cut off mid-write is never taken for the latest; ``keep`` bounds how many stay on disk.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


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
        """The state (shaped, typed and sharded like ``like``) and the data position."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.manager.directory}: no checkpoint")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

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
