"""A run's pace and what the user sees of it.

:class:`Clock` times steps between *completed* steps (the loop waits for a step's metrics
before it reads the clock, so asynchronous dispatch cannot hide queued work), leaves out the
first step (it compiles) and the pauses for validation and checkpoints, and derives images per
second and the ETA. :class:`Progress` is a tqdm bar on a terminal, and a plain line every
``log_every`` steps otherwise (a SLURM log gets no carriage returns).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm


class Clock:
    """Seconds per step over the last interval and over the run, without pauses."""

    def __init__(self, total_steps: int, batch_size: int):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.mark: tuple[float, int] | None = None  # (time, step) of the last completed step
        self.paused = 0.0                            # seconds paused since the mark
        self.timed = (0.0, 0)                        # (seconds, steps) timed so far

    def completed(self, step: int) -> dict[str, float]:
        """``step_time_s``, ``images_per_s`` (global) and ``eta_s`` since the last call, once
        ``step`` is complete; nothing at the first call (it starts the clock)."""
        now = time.perf_counter()
        mark, paused = self.mark, self.paused
        self.mark, self.paused = (now, step), 0.0
        if mark is None or step == mark[1]:
            return {}
        seconds, steps = now - mark[0] - paused, step - mark[1]
        self.timed = (self.timed[0] + seconds, self.timed[1] + steps)
        per_step = seconds / steps
        return {"step_time_s": per_step, "images_per_s": self.batch_size / per_step,
                "eta_s": (self.total_steps - step) * self.timed[0] / self.timed[1]}

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Leaves the time of the block out of the step times (call it with the steps before
        it complete)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start


def duration(seconds: float) -> str:
    """``1d 02:03:04`` / ``02:03:04``."""
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{h:02d}:{m:02d}:{s:02d}"


class Progress:
    """Process 0's progress on stderr: a tqdm bar on a terminal, else one line per log."""

    def __init__(self, start: int, total: int, shown: tuple[str, ...], enabled: bool):
        self.total, self.shown, self.enabled = total, shown, enabled
        self.bar = (tqdm(total=total, initial=start, unit="step")
                    if enabled and sys.stderr.isatty() else None)

    def update(self, step: int, scalars: dict[str, float] | None = None) -> None:
        """One more step done; ``scalars`` at the steps that log."""
        if self.bar is not None:
            self.bar.update(1)
            if scalars:
                self.bar.set_postfix_str(" ".join(f"{k} {scalars[k]:.4f}" for k in self.shown))
        elif self.enabled and scalars:
            parts = [f"step {step}/{self.total}"]
            parts += [f"{k} {scalars[k]:.4f}" for k in self.shown]
            if "step_time_s" in scalars:
                parts += [f"{scalars['step_time_s']:.3f} s/step",
                          f"{scalars['images_per_s']:.2f} img/s",
                          f"ETA {duration(scalars['eta_s'])}"]
            print("  ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
