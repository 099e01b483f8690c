"""The work directory of a run: made (or checked) before anything loads, and held by one run at
a time.

The holder is process 0. It keeps an exclusive POSIX record lock (``fcntl.lockf``, which NFS
and Lustre honour) on ``WORKDIR/run.lock`` for the run's whole life, and writes there who holds
it. The OS drops the lock with the process, so a killed run blocks nobody.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "run.lock"


class WorkdirError(RuntimeError):
    """The work directory cannot be used: not a folder, not writable, or in use."""


def make(workdir: Path) -> bool:
    """Creates ``workdir`` (and its parents), or says in one line why it cannot be used;
    whether it was created."""
    for folder in (workdir, *workdir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise WorkdirError(f"config.workdir={str(workdir)!r}: {folder} is a file, "
                                   "not a folder")
            break
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"config.workdir={str(workdir)!r}: cannot create it "
                           f"({e.strerror})") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"config.workdir={str(workdir)!r}: not writable")
    return created


class Lock:
    """Holds ``workdir``'s lock while open (a context manager); a second holder is refused with
    a :class:`WorkdirError` that names the first (host, pid and start time). With ``created``
    (the run made ``workdir``), a run that fails before it writes anything else removes the
    folder again: a refused run leaves nothing."""

    def __init__(self, workdir: Path, created: bool = False):
        self.path = workdir / LOCK_FILE
        self.created = created
        self.fd: int | None = None

    def __enter__(self) -> Lock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"{self.path}: cannot open the run's lock ({e.strerror})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another run"
            os.close(fd)  # this process held no lock on it: closing drops nothing
            raise WorkdirError(f"{self.path.parent}: in use by {holder}; wait for it to end "
                               "or give another --config.workdir") from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"the run of pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{started}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock; the file stays, naming the last holder
            self.fd = None
        if exc_type is not None and self.created and os.listdir(self.path.parent) == [LOCK_FILE]:
            self.path.unlink()
            self.path.parent.rmdir()
