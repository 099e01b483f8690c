"""Running the commands as real processes in the tests: started with a shared compilation cache,
polled while they run, and waited for."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).parents[1]


def env(cache: Path) -> dict[str, str]:
    """The environment of a CPU run that reads and fills the compilation cache ``cache``."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def start(cmd: list[str], log: Path, cache: Path) -> subprocess.Popen:
    """``cmd`` from the repository root, its stdout and stderr into ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(cache), stdout=out,
                                stderr=subprocess.STDOUT)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path,
             timeout: float = 600) -> None:
    """Polls ``condition()`` while ``proc`` runs (killed when it times out)."""
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode} early:\n{log.read_text()[-3000:]}"
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> tuple[int, str]:
    """``proc``'s exit code and its log, once it ends (killed when it times out)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, log.read_text()
