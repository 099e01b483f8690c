"""Preemption: on SIGTERM (how SLURM, Kubernetes and spot instances preempt) or SIGINT, a run
finishes its current step, checkpoints it and exits with :data:`EXIT_CODE`; the same command
then resumes it exactly. A second SIGINT stops at once.

All processes of a multi-process run stop after the same step, whichever of them got the
signal: jax's preemption sync point (its coordination service spreads the notice, and the
processes agree on the largest step any of them has reached, plus one). There jax's own
handler takes SIGTERM, and SIGINT is passed on to it as a SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, run again


class Preemption:
    """``reached(step)`` after each step: True when the run is to checkpoint and stop there.
    A context manager: the previous signal handlers come back on exit."""

    def __init__(self):
        self.signal: int | None = None
        self.distributed = jax.process_count() > 1
        signals = [signal.SIGINT] if self.distributed else [signal.SIGINT, signal.SIGTERM]
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame) -> None:
        del frame
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
              "(a second Ctrl-C stops at once, without one)", file=sys.stderr, flush=True)
        if self.distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # to jax's handler: every process agrees

    def reached(self, step: int) -> bool:
        """Whether to checkpoint ``step`` and stop; call it after every step, in every process."""
        if self.distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signal is not None

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
