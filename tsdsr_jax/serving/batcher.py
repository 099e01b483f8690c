"""Requests of many clients as batched device calls: the server's scheduler.

    batcher = Batcher(max_batch_size=8)
    result = batcher.submit(pipe, "photo.png", lr_uint8_hwc).result()   # a pipeline.Result

One device thread takes the requests that wait for it, and runs those of one pipeline (one set
of options) and one size class, up to ``max_batch_size``, as one call of
:meth:`Pipeline.batches <tsdsr_jax.inference.pipeline.Pipeline.batches>`. A call is padded to
a power of two (1, 2, 4, ... ``max_batch_size``), so that each class has a few programs, which
:meth:`Batcher.warm_up` compiles before the server opens. A request's output is what it would be
alone: its noise derives from the seed and its key. A failed image fails its own request only.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import NamedTuple

import jax
import numpy as np

from tsdsr_jax.inference.canvas import SizeClass
from tsdsr_jax.inference.pipeline import Pipeline


def buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a call is padded to: powers of two below ``max_batch_size``, and it."""
    sizes = [1 << k for k in range(max_batch_size.bit_length()) if 1 << k < max_batch_size]
    return sizes + [max_batch_size]


def bucket(n: int, max_batch_size: int) -> int:
    """The batch size a call of ``n`` requests is padded to."""
    return next(b for b in buckets(max_batch_size) if b >= n)


class _Request(NamedTuple):
    pipe: Pipeline
    cls: SizeClass
    key: str
    image: np.ndarray
    future: Future


class Batcher:
    """Runs submitted images on the device, batched (see the module's docstring).
    ``wait_s``: how long a request that finds the device idle waits for others to join it.
    ``log`` hears one line per call and per compile."""

    def __init__(self, max_batch_size: int = 8, seed: int = 42, wait_s: float = 0.01,
                 log: Callable[[str], None] = print):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: must be at least 1")
        self.max_batch_size, self.seed, self.wait_s, self.log = max_batch_size, seed, wait_s, log
        self.calls = 0        # device calls made
        self.served = 0       # images returned
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._compiled: set[tuple[int, SizeClass, int]] = set()
        self._thread = threading.Thread(target=self._run, name="tsdsr-device", daemon=True)
        self._thread.start()

    def submit(self, pipe: Pipeline, key: str, image: np.ndarray) -> Future:
        """Queues one uint8 RGB image (h, w, 3); the future gives its :class:`Result`."""
        future: Future = Future()
        self._queue.put(_Request(pipe, pipe.size_class(*image.shape[:2]), key, image, future))
        return future

    def warm_up(self, pipe: Pipeline, lr_sizes: Iterable[tuple[int, int]]) -> int:
        """Compiles (and runs once, on zeros) every batch size of the size classes of LR images
        of ``lr_sizes`` (height, width), before any request; returns how many programs."""
        classes = {pipe.size_class(*size): size for size in lr_sizes}
        for cls, size in classes.items():
            for n in buckets(self.max_batch_size):
                tic = time.perf_counter()
                image = np.zeros((*size, 3), np.uint8)
                jax.block_until_ready(pipe.dispatch([image] * n, range(n),
                                                    jax.random.key(self.seed), cls))
                self._compiled.add((id(pipe), cls, n))
                self.log(f"compiled size class {cls} (batch {n}) in "
                         f"{time.perf_counter() - tic:.1f} s")
        return len(classes) * len(buckets(self.max_batch_size))

    def close(self) -> None:
        """Finishes the requests queued so far, then stops the device thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        waiting: list[_Request] = []
        closing = False
        while waiting or not closing:
            if not waiting:
                request = self._queue.get()
                if request is None:
                    break
                waiting.append(request)
                closing = self._gather(waiting)
            else:
                closing = self._drain(waiting) or closing
            first = waiting[0]
            group = [r for r in waiting if r.pipe is first.pipe and r.cls == first.cls]
            group = group[:self.max_batch_size]
            waiting = [r for r in waiting if r not in group]
            self._call(group)

    def _gather(self, waiting: list[_Request]) -> bool:
        """Waits up to ``wait_s`` for requests that can join the first; whether to close."""
        deadline = time.monotonic() + self.wait_s
        first = waiting[0]
        while sum(r.pipe is first.pipe and r.cls == first.cls
                  for r in waiting) < self.max_batch_size:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is None:
                return True
            waiting.append(request)
        return False

    def _drain(self, waiting: list[_Request]) -> bool:
        """Adds every queued request to ``waiting``; whether to close."""
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                return False
            if request is None:
                return True
            waiting.append(request)

    def _call(self, group: list[_Request]) -> None:
        """One device call for requests of one pipeline and class; sets their futures."""
        pipe, cls = group[0].pipe, group[0].cls
        size = bucket(len(group), self.max_batch_size)
        if (id(pipe), cls, size) not in self._compiled:
            self.log(f"compiling size class {cls} (batch {size}): its first call waits")
        tic = time.perf_counter()
        try:
            [results] = pipe.batches([(r.key, r.image) for r in group], size, self.seed,
                                     window=size)
        except Exception as e:  # noqa: BLE001 -- the server goes on; the requests hear why
            for r in group:
                r.future.set_exception(e)
            return
        self._compiled.add((id(pipe), cls, size))
        self.calls += 1
        self.served += len(group)
        self.log(f"{len(group)} image(s) in one call (batch {size}, size class {cls}): "
                 f"{(time.perf_counter() - tic) * 1000:.0f} ms")
        for r, result in zip(group, results):
            r.future.set_result(result)

