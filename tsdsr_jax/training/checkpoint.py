"""Training checkpoints with orbax: the train state and the data iterator's position.

Orbax writes each step into a temporary folder and renames it when complete, so a checkpoint
cut off mid-write is never taken for the latest; ``keep`` bounds how many stay on disk. A
finalized step that cannot be read (a truncated or deleted file, as a failing disk or a full
quota leaves it) is named and skipped for the newest older one that can. Each step also gets
the list of its files with their sizes and CRC-32s (:data:`FILE_LIST`), so that a damaged
file is found, and named, before orbax reads anything.

A save that fails (a full disk or quota, an I/O error) removes its temporary folder and raises
one :class:`CheckpointWriteError` naming the step, the cause and the checkpoint's size; the
steps already saved stay. A temporary folder that a killed run left is removed on opening.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
FILE_LIST = "tsdsr_files.json"  # in each step's folder: {relative path: [bytes, CRC-32]}
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's folder of a step being written
# Write errors after which a later save may succeed (space can be freed); others are final.
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(RuntimeError):
    """No checkpoint of a folder can be read."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; ``errno`` is the OS error, when one was found."""

    def __init__(self, message: str, errno_: int | None):
        super().__init__(message)
        self.errno = errno_


def _os_error(error: BaseException) -> int | None:
    """The OS error number behind an exception (its own, a cause's, or the one tensorstore
    writes into its message as ``os_error_code='28'``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        if match := re.search(r"os_error_code='?(\d+)", str(error)):
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def _megabytes(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MB"


class _OrbaxErrors(logging.Filter):
    """Drops the error logs of orbax's threads and of asyncio's tasks that orbax left (each a
    traceback): a failed save reaches the user once, as a :class:`CheckpointWriteError`.

    A record is orbax's when a frame of its traceback is in orbax, or when it names a
    checkpoint's temporary folder (tensorstore's errors, set on asyncio futures, carry no
    Python frames)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        files = [record.pathname]
        if record.exc_info and record.exc_info[2]:
            files += [frame.filename for frame in traceback.extract_tb(record.exc_info[2])]
        if any(f"{os.sep}orbax{os.sep}" in f for f in files):
            return False
        return TMP_SUFFIX not in record.getMessage()


def _unraisable(previous: Callable) -> Callable:
    """``sys.unraisablehook`` without the "Event loop is closed" errors of tensorstore's
    callbacks into the event loop of a save that failed (one traceback per array)."""
    def hook(info) -> None:
        if not (isinstance(info.exc_value, RuntimeError)
                and str(info.exc_value) == "Event loop is closed"):
            previous(info)
    hook.hushes_orbax = True
    return hook


def _hush_failed_saves() -> None:
    """Leaves a failed save's report to :class:`CheckpointWriteError` (once per process)."""
    for logger in map(logging.getLogger, ("absl", "asyncio")):
        if not any(isinstance(f, _OrbaxErrors) for f in logger.filters):
            logger.addFilter(_OrbaxErrors())
    if not getattr(sys.unraisablehook, "hushes_orbax", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_file_list(folder: Path) -> None:
    """Records every file under ``folder`` with its size and CRC-32 (written, then renamed)."""
    files = {p.relative_to(folder).as_posix(): [p.stat().st_size, _crc32(p)]
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != FILE_LIST}
    tmp = folder / f".{FILE_LIST}.partial"
    tmp.write_text(json.dumps(files, indent=0))
    os.replace(tmp, folder / FILE_LIST)


def damaged_file(folder: Path) -> str | None:
    """The first file of ``folder`` that is not as :func:`write_file_list` recorded it (None
    when all are, or when nothing was recorded)."""
    try:
        files = json.loads((folder / FILE_LIST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"{folder / FILE_LIST} cannot be read ({e})"
    for name, (size, crc) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
        if _crc32(path) != crc:
            return f"{path} is damaged (its CRC-32 differs from the one written)"
    return None


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
        if create:
            self._remove_partials()  # what a killed run left

    def _remove_partials(self, before: int | None = None) -> None:
        """Deletes the temporary folders of saves that did not complete (of steps before
        ``before`` only, when given; process 0)."""
        if jax.process_index() == 0:
            for tmp in Path(self.manager.directory).glob(f"*{TMP_SUFFIX}*"):
                step = tmp.name.partition(".")[0]
                if before is None or (step.isdigit() and int(step) < before):
                    shutil.rmtree(tmp, ignore_errors=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, data_state: dict | None = None) -> None:
        """Writes ``step`` and waits until it is complete, or raises
        :class:`CheckpointWriteError` with nothing of it left on disk."""
        _hush_failed_saves()
        self._remove_partials(before=step)  # late writes of an earlier failed save
        existed = step in self.manager.all_steps()
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {})))
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                write_file_list(self._folder(step))
        except Exception as e:  # orbax raises whatever its writer met
            raise self._write_error(step, state, e, existed) from None

    def _write_error(self, step: int, state: PyTree, error: Exception, existed: bool
                     ) -> CheckpointWriteError:
        """The one-line error of a failed save of ``step``, once its partial files are gone
        (and the step's folder, unless it was there before)."""
        directory = Path(self.manager.directory)
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()  # orbax's other writers of the step, if any
        self._remove_partials()
        if jax.process_index() == 0 and not existed:
            shutil.rmtree(self._folder(step), ignore_errors=True)
        with contextlib.suppress(Exception):
            self.manager.reload()  # forget the failed step
        code = _os_error(error)
        cause = (f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code
                 else " ".join(str(error).split())[:300] or type(error).__name__)
        size = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state))
        space = ""
        with contextlib.suppress(OSError):
            space = f", {_megabytes(shutil.disk_usage(directory).free)} free"
        newest = [s for s in self.manager.all_steps() if s != step]
        kept = (f"the newest checkpoint is step {max(newest)}" if newest
                else "no checkpoint is saved yet")
        return CheckpointWriteError(
            f"checkpoint of step {step} not written to {directory}: {cause}; a checkpoint "
            f"takes up to {_megabytes(size)}{space}; {kept}", code)

    def _folder(self, step: int) -> Path:
        return Path(self.manager.directory) / str(step)

    def restore(self, like: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """The state (shaped, typed and sharded like ``like``) and the data position of
        ``step``, or of the newest step that can be read."""
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._first_readable(step, lambda s: self.manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                       data=ocp.args.JsonRestore())))
        return restored.state, restored.data

    def restore_raw(self, step: int | None = None) -> dict:
        """The saved state as plain nested dicts and lists of numpy arrays: no template, on any
        number of devices (whatever mesh saved it); ``step`` or the newest readable one."""
        manager = ocp.CheckpointManager(self.manager.directory, item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(create=False))

        def read(candidate: int) -> dict:
            saved = manager.item_metadata(candidate)["state"].tree
            as_numpy = jax.tree_util.tree_map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
            return manager.restore(candidate, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(restore_args=as_numpy))).state

        try:
            return self._first_readable(step, read)
        finally:
            manager.close()

    def _first_readable(self, step: int | None, read: Callable[[int], Any]) -> Any:
        """``read(step)``, or without a step ``read`` of the newest step that can be read;
        each step that cannot is named on stderr."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{self.manager.directory}: no checkpoint")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{self.manager.directory}: no checkpoint of step {step} "
                                      f"(steps: {', '.join(map(str, sorted(steps)))})")
            steps = [step]
        failures = []
        for candidate in steps:
            try:
                if damage := damaged_file(self._folder(candidate)):
                    raise CheckpointError(damage)
                result = read(candidate)
            except Exception as e:  # a damaged step fails in whichever reader meets it
                failures.append(f"step {candidate}: {_reason(e)}")
                print(f"warning: {self.manager.directory}: checkpoint step {candidate} cannot "
                      f"be read ({_reason(e)})", file=sys.stderr)
                continue
            if failures:
                print(f"warning: restoring step {candidate} instead", file=sys.stderr)
            return result
        raise CheckpointError(f"{self.manager.directory}: no checkpoint can be read ("
                              + "; ".join(failures) + ")")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a failed save was reported when it failed
            self.manager.close()
        self._remove_partials()


def read_state(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The state saved in a checkpoints folder, as plain nested dicts of numpy arrays
    (:meth:`Checkpoints.restore_raw`); ``step`` or the newest readable one."""
    checkpoints = Checkpoints(directory, create=False)
    try:
        return checkpoints.restore_raw(step)
    finally:
        checkpoints.close()
