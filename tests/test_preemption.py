"""Preemption and crashes of `train.py` (configs/tiny.py, real processes and real signals):
SIGTERM checkpoints the step it is on and exits 75, SIGKILL loses only what followed the last
checkpoint, and in both cases the same command resumes to the same weights as a run that was
never stopped. Ctrl-C asks like SIGTERM; a second one stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from processes import finish, start, wait_for

from tsdsr_jax.training.checkpoint import Checkpoints, read_state
from tsdsr_jax.training.preemption import EXIT_CODE, Preemption

STEPS = 20


def command(workdir: Path, checkpoint_every: int = 1000) -> list[str]:
    return [sys.executable, "train.py", "--config", "configs/tiny.py",
            f"--config.workdir={workdir}", f"--config.total_steps={STEPS}",
            "--config.log_every=1", "--config.validate_every=1000", "--config.tsd.dasm_steps=1",
            f"--config.checkpoint_every={checkpoint_every}"]


def logged_steps(workdir: Path) -> list[dict]:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def tensorboard_steps(workdir: Path) -> list[int]:
    """The steps of the scalar events in the run's TensorBoard files (TFRecord framing: a
    length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for file in sorted((workdir / "tensorboard").glob("events*")):
        data = file.read_bytes()
        at = 0
        while at + 12 <= len(data):
            length = int.from_bytes(data[at:at + 8], "little")
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.summary.value:
                steps.append(event.step)
    return steps


def state(workdir: Path) -> dict:
    return read_state(workdir / "checkpoints")


def assert_same_state(got: dict, want: dict) -> None:
    assert int(got["step"]) == int(want["step"]) == STEPS
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def cache(jax_cache) -> Path:
    return jax_cache


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache) -> Path:
    """A run that nobody stops."""
    workdir = tmp_path_factory.mktemp("straight")
    code, out = finish(*run(command(workdir), workdir.parent / "straight.log", cache))
    assert code == 0, out[-3000:]
    return workdir


def run(cmd: list[str], log: Path, cache: Path) -> tuple[subprocess.Popen, Path]:
    return start(cmd, log, cache), log


def test_sigint_asks_once_and_stops_at_the_second():
    before = signal.getsignal(signal.SIGINT)  # pytest-xdist's workers ignore SIGINT
    with Preemption() as preemption:
        assert not preemption.reached(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.reached(2) and preemption.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(tmp_path, cache, straight):
    workdir = tmp_path / "run"
    proc, log = run(command(workdir), tmp_path / "first.log", cache)
    wait_for(lambda: len(logged_steps(workdir)) >= 2, proc, log)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, log)
    assert code == EXIT_CODE, out[-3000:]
    stopped = logged_steps(workdir)[-1]["step"]
    assert 2 <= stopped < STEPS
    assert f"stopped at step {stopped}, checkpointed" in out and "Traceback" not in out
    assert int(state(workdir)["step"]) == stopped  # the step it was on, between checkpoints
    assert tensorboard_steps(workdir)[-1] == stopped  # the writer was flushed and closed

    code, out = finish(*run(command(workdir), tmp_path / "resumed.log", cache))
    assert code == 0, out[-3000:]
    assert f"resumed from step {stopped}" in out
    want = {m["step"]: m["loss"] for m in logged_steps(straight)}
    assert {m["step"]: m["loss"] for m in logged_steps(workdir)} == want
    assert_same_state(state(workdir), state(straight))


def test_sigkill_then_resume_from_the_last_checkpoint(tmp_path, cache, straight):
    workdir = tmp_path / "run"
    proc, log = run(command(workdir, checkpoint_every=5), tmp_path / "first.log", cache)
    wait_for(lambda: (workdir / "checkpoints" / "5").is_dir()
             and len(logged_steps(workdir)) >= 7, proc, log)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = Checkpoints(workdir / "checkpoints", create=False)
    saved = last.latest_step()
    last.close()
    assert saved is not None and saved < STEPS

    code, out = finish(*run(command(workdir, checkpoint_every=5), tmp_path / "resumed.log",
                            cache))
    assert code == 0, out[-3000:]
    assert f"resumed from step {saved}" in out
    want = {m["step"]: m["loss"] for m in logged_steps(straight)}
    resumed = logged_steps(workdir)
    assert {m["step"] for m in resumed} == set(want)
    assert all(m["loss"] == want[m["step"]] for m in resumed)  # steps run twice: equal losses
    assert_same_state(state(workdir), state(straight))
