"""Sharded training on CPU devices: the mesh and its rules, the train step under three meshes
against one device, a checkpoint moved between meshes, and a real two-process run of train.py
against one process (two jax.distributed CPU processes on loopback)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tsdsr_jax import sharding
from tsdsr_jax.training.checkpoint import read_state
from tsdsr_jax.training.preemption import EXIT_CODE

ROOT = Path(__file__).parents[1]


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((64, 1536), 8, 0) == P(None, "fsdp")
    assert sharding.fsdp_spec((1536, 6), 8, 0) == P("fsdp", None)
    assert sharding.fsdp_spec((3, 3, 6, 10), 4, 0) == P()            # nothing divides
    assert sharding.fsdp_spec((3, 3, 6, 12), 4, 0) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((64, 1536), 8, 2 ** 18) == P()         # small: whole
    assert sharding.fsdp_spec((64, 1536), 1, 0) == P()


def test_mesh_fills_and_refuses():
    mesh = sharding.make_mesh(sharding.ShardingConfig())
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    with pytest.raises(ValueError, match="does not fit"):
        sharding.make_mesh(sharding.ShardingConfig(data=2, fsdp=3))
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(sharding.ShardingConfig(data=-1, fsdp=-1))
    with pytest.raises(ValueError, match="adapters"):
        sharding.ShardingConfig(adapters="zero3")


def cpu_env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} "
                         f"--xla_force_host_platform_device_count={devices}"}


def test_sharded_steps_equal_one_device(tmp_path):
    """Meshes 8x1, 4x2 and 1x8 (frozen base, adapters and optimiser states split over fsdp;
    batch over data x fsdp) give the one-device losses and LoRA weights after two steps; a
    checkpoint saved under 4x2 restores under 1x8; inference with its batch split over 4x2
    gives the one-device images.

    The LoRA weights agree to ~5e-8 of their largest magnitude. Tensor by tensor the worst is
    ~6e-5 of its own largest value: a lora_B two Adam steps away from zero, where elements with
    a near-zero gradient turn float32 summation-order noise into a visible fraction of ±lr."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "tests/sharded_steps.py", str(out),
                           str(tmp_path / "ckpt")], cwd=ROOT, env=cpu_env(8),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    print(json.dumps(result))
    for mesh in ("8x1", "4x2", "1x8"):
        assert result[mesh]["loss"] <= 1e-5, mesh
        assert result[mesh]["weights"]["all"] <= 1e-5, mesh
        assert result[mesh]["weights"]["worst tensor"] <= 2e-4, mesh
    assert result["4x2"]["split_frozen_arrays"] > 100  # the base really is split
    assert result["restored"]["weights"] == result["4x2"]["weights"]  # restored exactly
    assert result["restored"]["same_shardings"]
    assert result["restored"]["data"] == {"position": 7}
    # uint8 outputs: float differences of ~1e-6 flip the rounding of a rare value by one level
    assert result["inference"]["max"] <= 1 and result["inference"]["differ"] <= 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_command(workdir: Path, total_steps: int, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--config", "configs/tiny.py",
            f"--config.workdir={workdir}", f"--config.total_steps={total_steps}",
            "--config.log_every=1", "--config.batch_size=2", "--config.data.shards=2",
            "--config.tsd.dasm_steps=1", *extra]


Run = tuple[subprocess.Popen, Path]  # a process and the file its output goes to


def start(command: list[str], env: dict[str, str], log: Path) -> Run:
    """A process writing its output to ``log`` (a file: no pipe fills while others run)."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT), log


def two_processes(workdir: Path, total_steps: int) -> list[Run]:
    """train.py as two jax.distributed processes on loopback, one CPU device each (sharing a
    compilation cache in the work directory's parent)."""
    port = free_port()
    env = {**cpu_env(1), "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return [start(train_command(workdir, total_steps, f"--coordinator=localhost:{port}",
                                "--num_processes=2", f"--process_id={k}"), env,
                  workdir.parent / f"{workdir.name}-{total_steps}-{k}.log") for k in range(2)]


def wait(runs: list[Run], code: int = 0) -> list[str]:
    """Each process's output, once all have exited with ``code``."""
    for proc, log in runs:
        proc.wait(timeout=900)
        assert proc.returncode == code, log.read_text()[-3000:]
    return [log.read_text() for _, log in runs]


def logged_steps(workdir: Path) -> int:
    try:
        return len((workdir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def run_state(workdir: Path):
    return read_state(workdir / "checkpoints")


def test_two_processes_train_like_one(tmp_path):
    """configs/tiny.py for 16 steps: two processes (one CPU device each, one data shard each)
    against one process with two devices reading both shards. The two processes are preempted
    together (SIGTERM, as SLURM does) a few steps in: they agree on a step, checkpoint it
    together and exit 75; two new ones, the same command, resume it to the end."""
    total = 16
    one = start(train_command(tmp_path / "one", total), cpu_env(2), tmp_path / "one.log")
    first = two_processes(tmp_path / "two", total)
    while logged_steps(tmp_path / "two") < 2:
        assert all(proc.poll() is None for proc, _ in first), first[0][1].read_text()[-3000:]
        time.sleep(0.05)
    for proc, _ in first:
        proc.send_signal(signal.SIGTERM)
    wait(first, code=EXIT_CODE)
    stopped = int(run_state(tmp_path / "two")["step"])
    assert 2 <= stopped < total and logged_steps(tmp_path / "two") == stopped
    assert all(f"resumed from step {stopped}" in out
               for out in wait(two_processes(tmp_path / "two", total)))
    wait([one])
    metrics = {name: [json.loads(line) for line in
                      (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one", "two")}
    assert [m["step"] for m in metrics["two"]] == list(range(1, total + 1))  # process 0 alone
    for a, b in zip(metrics["two"], metrics["one"], strict=True):
        for key in ("loss", "reg_loss", "tsd_loss", "data_loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(abs(b[key]), 1e-3), (key, a, b)
    want, got = run_state(tmp_path / "one"), run_state(tmp_path / "two")
    assert got["step"] == want["step"] == total
    for x, y in zip(jax.tree_util.tree_leaves((got["student"], got["fake_score"])),
                    jax.tree_util.tree_leaves((want["student"], want["fake_score"]))):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * max(np.abs(y).max(), 1e-3))
