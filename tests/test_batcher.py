"""The server's scheduler: which requests share a device call, the padded batch sizes, and a
failure that stays with its own requests. The pipelines are stand-ins that record their calls
(the real one's batch invariance is tests/test_canvas.py's; the server's, tests/test_serve.py's)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tsdsr_jax.inference.pipeline import Result
from tsdsr_jax.serving.batcher import Batcher, bucket, buckets


class Recording:
    """A pipeline whose size class is the image's height, whose SR is the image plus one, and
    which waits for ``gate`` before its first call returns (so that requests pile up)."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[list[str], int]] = []
        self.fail = fail
        self.gate = threading.Event()
        self.entered = threading.Event()

    def size_class(self, height: int, width: int) -> int:
        return height

    def batches(self, items, batch_size, seed, window):
        items = list(items)
        assert len(items) <= batch_size == window and len({im.shape for _, im in items}) == 1
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(([key for key, _ in items], batch_size))
        if self.fail:
            raise RuntimeError("device lost")
        yield [Result(key, im, im + 1) for key, im in items]


def image(height: int, value: int = 0) -> np.ndarray:
    return np.full((height, 8, 3), value, np.uint8)


def test_buckets():
    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]
    assert [bucket(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


def test_requests_of_one_pipeline_and_class_share_calls():
    a, b = Recording(), Recording()
    batcher = Batcher(max_batch_size=4, wait_s=0, log=lambda line: None)
    first = batcher.submit(a, "first", image(16))  # runs alone, held at the gate
    assert a.entered.wait(10)
    requests = [(a, 16), (b, 16), (a, 32), (a, 16), (a, 16), (a, 16), (a, 16), (b, 16)]
    futures = [batcher.submit(pipe, f"r{i}", image(h, i)) for i, (pipe, h) in
               enumerate(requests)]
    a.gate.set()
    b.gate.set()
    assert first.result(10).sr.max() == 1
    for i, future in enumerate(futures):
        result = future.result(10)
        assert result.key == f"r{i}" and result.sr.max() == i + 1  # its own, in order
    batcher.close()
    # the waiting requests: in the order of their first, 4 at most, padded to 1, 2, 4
    assert a.calls == [(["first"], 1), (["r0", "r3", "r4", "r5"], 4), (["r2"], 1),
                       (["r6"], 1)]
    assert b.calls == [(["r1", "r7"], 2)]
    assert batcher.calls == 5 and batcher.served == 9


def test_a_failed_call_fails_its_own_requests_only():
    broken, working = Recording(fail=True), Recording()
    broken.gate.set()
    working.gate.set()
    batcher = Batcher(max_batch_size=2, log=lambda line: None)
    lost = batcher.submit(broken, "lost", image(16))
    kept = batcher.submit(working, "kept", image(16))
    with pytest.raises(RuntimeError, match="device lost"):
        lost.result(10)
    assert kept.result(10).sr is not None
    assert batcher.submit(working, "next", image(16)).result(10).key == "next"
    batcher.close()
