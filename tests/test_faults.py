"""Faults during a run, with real processes, signals and (as root) a real full file system: a
second run in a work directory, unreadable samples mid-run, full disks under training and
inference, oversized and long-named inputs, config files that raise, and stops by signal. Each
ends in one line, a non-zero exit where work was left, and nothing finished lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from processes import ROOT, env, finish, start, wait_for

from tsdsr_jax.inference import command
from tsdsr_jax.training import run_config
from tsdsr_jax.training.checkpoint import Checkpoints
from tsdsr_jax.training.workdir import Lock

TINY_INFER = ["--model", "tiny", "--precision", "fp32", "--attention", "xla",
              "--process-size", "128"]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                                reason="mounting a small tmpfs needs root (and mount)")


def train_command(workdir: Path, data: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", "--config", "configs/tiny.py",
            f"--config.workdir={workdir}", f"--config.data.roots=('{data}',)",
            "--config.total_steps=12", "--config.log_every=1", "--config.validate_every=1000",
            "--config.checkpoint_every=4", "--config.tsd.dasm_steps=1", *overrides]


def logged(workdir: Path) -> list[str]:
    try:
        return (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []


def errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


def steps_saved(workdir: Path) -> list[int]:
    checkpoints = Checkpoints(workdir / "checkpoints", create=False)
    try:
        return sorted(checkpoints.manager.all_steps())
    finally:
        checkpoints.close()


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:  # root in a container without the right to mount
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(filler: Path) -> None:
    """Grows the existing file ``filler`` until its file system is full.

    The file is made beforehand: on a full tmpfs, creating one can itself fail with ENOSPC.
    """
    with open(filler, "ab") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\xff" * (1 << 16))


@pytest.fixture(scope="module")
def cache(jax_cache) -> Path:
    return jax_cache


@pytest.fixture
def data(tmp_path) -> Path:
    """A copy of the bundled training samples, for a test to break."""
    return Path(shutil.copytree(ROOT / "tests" / "data" / "train", tmp_path / "data"))


# --------------------------------------------------------------------------- training


def test_a_second_run_in_a_workdir_is_refused_by_name(tmp_path, data, cache):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with Lock(workdir):  # this process holds it, as a first run would
        code, out = finish(start(train_command(workdir, data), tmp_path / "second.log", cache),
                           tmp_path / "second.log")
        assert code == 2, out
        assert errors(out) == [f"error: {workdir}: in use by the run of pid {os.getpid()} on "
                               f"{os.uname().nodename}, started "
                               + errors(out)[0].split(", started ")[1]]
        assert "Traceback" not in out and not (workdir / "metrics.jsonl").exists()
    # a killed holder's lock is no lock: the OS dropped it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from tsdsr_jax.training.workdir import Lock; "
                               f"Lock(Path({str(workdir)!r})).__enter__(); print(flush=True); "
                               "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE)
    holder.stdout.readline()
    holder.kill()
    holder.wait()
    with Lock(workdir):
        pass


@pytest.mark.parametrize("body, message", [
    ("def get_config():\n    return undefined_name\n",
     ":2: NameError: name 'undefined_name' is not defined"),
    ("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
     "    return c.missing\n", ":5: AttributeError: "),
])
def test_a_config_file_that_raises_is_one_line(tmp_path, body, message):
    path = tmp_path / "config.py"
    path.write_text(body)
    with pytest.raises(run_config.ConfigError, match="^--config ") as e:
        run_config.read(["--config", str(path)])
    assert str(e.value).startswith(f"--config {path}{message}") and "\n" not in str(e.value)


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, data, cache):
    (tmp_path / "file").write_text("")
    log = tmp_path / "run.log"
    code, out = finish(start(train_command(tmp_path / "file" / "run", data), log, cache), log)
    assert code == 2 and errors(out) == [
        f"error: config.workdir='{tmp_path / 'file' / 'run'}': {tmp_path / 'file'} is a file, "
        "not a folder"], out


def test_an_unreadable_sample_checkpoints_then_is_skipped(tmp_path, data, cache):
    """With skip_invalid=False, a sample truncated mid-run stops the run with the step it
    reached checkpointed (exit 65); by default the same command then skips it, names it and
    counts it, and trains to the end."""
    workdir = tmp_path / "run"
    log = tmp_path / "strict.log"
    proc = start(train_command(workdir, data, "--config.data.skip_invalid=False"), log, cache)
    wait_for(lambda: len(logged(workdir)) >= 2, proc, log)
    hr = data / "gt" / "coffee.png"
    hr.write_bytes(hr.read_bytes()[:200])  # truncated under the running job
    code, out = finish(proc, log)
    assert code == 65, out[-3000:]
    reached = len(logged(workdir))
    assert 2 <= reached < 12 and steps_saved(workdir)[-1] == reached
    [line] = errors(out)
    assert str(hr) in line and f"step {reached} is checkpointed" in line
    assert "data.skip_invalid=True" in line and "Traceback" not in out

    log = tmp_path / "skipping.log"
    code, out = finish(start(train_command(workdir, data, "--config.data.max_skipped=0.5"),
                             log, cache), log)
    assert code == 0, out[-3000:]
    assert f"resumed from step {reached}" in out and "Traceback" not in out
    assert steps_saved(workdir)[-1] == 12
    names = (workdir / "skipped_samples.txt").read_text().splitlines()
    assert {n.split("\t")[0] for n in names} == {f"{data}/coffee"}
    assert '"data/skipped": 1' in logged(workdir)[-1]


def test_too_many_unreadable_samples_stop_with_a_checkpoint(tmp_path, data, cache):
    hr = data / "gt" / "chelsea.png"
    hr.write_bytes(b"not a png")
    workdir = tmp_path / "run"
    log = tmp_path / "run.log"
    code, out = finish(start(train_command(workdir, data, "--config.data.max_skipped=0.1"),
                             log, cache), log)
    assert code == 65, out[-3000:]
    [line] = errors(out)
    assert "1 of the 3 samples cannot be read, more than data.max_skipped=0.1" in line
    assert str(workdir / "skipped_samples.txt") in line
    assert steps_saved(workdir)[-1] == len(logged(workdir)) >= 1


@needs_root
def test_a_full_disk_at_a_checkpoint(tmp_path, data, cache):
    """A checkpoint that meets a full disk: one line, its partial files gone, training goes on
    to the next one due; at the last step it ends the run (exit 74), the newest intact
    checkpoint kept, and the same command resumes once there is space."""
    with tmpfs(tmp_path / "disk", "16m") as disk:
        workdir = disk / "run"
        filler = disk / "filler"
        filler.touch()
        log = tmp_path / "full.log"
        proc = start(train_command(workdir, data), log, cache)
        wait_for(lambda: len(logged(workdir)) >= 5, proc, log)  # step 4 is checkpointed
        proc.send_signal(signal.SIGSTOP)
        try:
            fill(filler)
        finally:
            proc.send_signal(signal.SIGCONT)
        code, out = finish(proc, log)
        assert code == 74, out[-3000:]
        warnings = [line for line in out.splitlines() if line.startswith("warning:")]
        [saving] = [w for w in warnings if "checkpoint" in w]
        assert "checkpoint of step 8 not written" in saving
        assert "No space left on device (ENOSPC)" in saving
        assert "the next checkpoint is due at step 12" in saving
        assert all("cannot write the logs" in w for w in warnings if w != saving)
        [line] = errors(out)
        assert "checkpoint of step 12 not written" in line and "ENOSPC" in line
        assert "a checkpoint takes up to" in line and "the newest checkpoint is step 4" in line
        assert "Traceback" not in out and "ERROR" not in out
        # it trained on to step 12 (the error above); the log lines the full disk took are said
        steps = [json.loads(line)["step"] for line in logged(workdir) if line.endswith("}")]
        assert steps == list(range(1, len(steps) + 1))
        assert len(steps) == 12 or any("cannot write the logs" in w for w in warnings)
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4"]

        filler.unlink()
        log = tmp_path / "resumed.log"
        code, out = finish(start(train_command(workdir, data), log, cache), log)
        assert code == 0 and "resumed from step 4" in out, out[-3000:]
        assert steps_saved(workdir) == [4, 8, 12]


def test_a_killed_runs_temporary_checkpoint_is_removed(tmp_path):
    left = tmp_path / "7.orbax-checkpoint-tmp-1234"
    (left / "state").mkdir(parents=True)
    Checkpoints(tmp_path).close()
    assert not left.exists()


def test_a_second_ctrl_c_exits_130_in_one_line(tmp_path, data, cache):
    workdir = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = start(train_command(workdir, data, "--config.total_steps=1000"), log, cache)
    wait_for(lambda: len(logged(workdir)) >= 2, proc, log)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc, log)
    assert code in (130, 75), out[-3000:]  # 75: the first Ctrl-C's checkpoint came first
    assert "Traceback" not in out
    if code == 130:
        assert out.rstrip().splitlines()[-1].startswith("interrupted: stopped at once")


# --------------------------------------------------------------------------- inference


def photos(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / name)
    return [folder / name for name in names]


def infer(cache: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tsdsr_jax.inference.command", *TINY_INFER,
                             "--cache-dir", str(cache), *argv], cwd=ROOT, env=env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_input_never_ends_the_folder(tmp_path, cache):
    """An image too large for the flags is refused by name before it is decoded; a name near
    the file system's limit still gets its output (the temporary name is short)."""
    long_name = "d" * 251 + ".png"
    photos(tmp_path / "in", ["a.png", long_name])
    Image.new("1", (12000, 12000)).save(tmp_path / "in" / "b_huge.png")
    proc = infer(cache, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 1, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", long_name]
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path / 'in' / 'b_huge.png'}: 12000x12000 is 144 MP, more than "
        "--max-pixels 16.8 MP; skipped"]
    assert "Traceback" not in err and "Warning" not in err
    assert out.strip().endswith(f"2 image(s) in {tmp_path / 'out'}; 1 failed")


def test_an_output_folder_under_a_file_is_one_line(tmp_path, capsys):
    photos(tmp_path / "in", ["a.png"])
    (tmp_path / "file").write_text("")
    assert command.main([*TINY_INFER, "-i", str(tmp_path / "in"),
                         "-o", str(tmp_path / "file" / "out")]) == 2
    assert capsys.readouterr().err == (f"error: -o {tmp_path / 'file' / 'out'}: "
                                       f"{tmp_path / 'file'} is not a folder\n")


@needs_root
def test_a_full_output_disk_stops_with_a_summary(tmp_path, cache):
    photos(tmp_path / "in", [f"p{i}.png" for i in range(6)])
    with tmpfs(tmp_path / "disk", "48k") as disk:
        proc = infer(cache, "-i", str(tmp_path / "in"), "-o", str(disk / "out"))
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 74, err
        written = sorted(p.name for p in (disk / "out").iterdir())
        assert 0 < len(written) < 6 and all(not n.startswith(".") for n in written)
        lines = [line for line in err.splitlines() if line.startswith(("error:", "stopped"))]
        assert len(lines) == 2 and "No space left on device" in lines[0], err
        assert lines[1].startswith(f"stopped: {len(written)} image(s) in {disk / 'out'}; ")
        assert "not done; free some space" in lines[1] and "Traceback" not in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_batch_and_says_how_far(tmp_path, cache, signum):
    photos(tmp_path / "in", [f"p{i:02d}.png" for i in range(12)])
    argv = ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--png-compression", "0"]
    proc = infer(cache, *argv)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "out").glob("*.png")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signum, err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert all(not n.startswith(".") for n in written)  # no partial file
    last = err.rstrip().splitlines()[-1]
    assert last.startswith(f"stopped by {signal.Signals(signum).name}: {len(written)} image(s)")
    assert f"{12 - len(written)} not done" in last and "Traceback" not in err

    proc = infer(cache, *argv, "--skip-existing")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "12 image(s)" in out, err
