"""tsdsr-infer on folders: resuming after a SIGKILL, shards, subfolders, formats and ICC
profiles, and files in the way that are not ours."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from tsdsr_jax.inference import command
from tsdsr_jax.io.images import MARK, _partial_name, is_output, save_image

ROOT = Path(__file__).parent.parent
TINY = ["--model", "tiny", "--precision", "fp32", "--attention", "xla", "--process-size", "128"]


def make_folder(folder: Path, n: int, size=(32, 40), seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"photo{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def folder_of(*argv: str) -> command.Folder:
    return command.Folder(command.parse_args(["--model", "tiny", *argv]))


def infer(cache: Path, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "tsdsr_jax.inference.command", *TINY,
                             "--cache-dir", str(cache), *argv],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killed_then_resumed_equals_a_clean_run(tmp_path, jax_cache):
    """SIGKILL once the first outputs are written, rerun with --skip-existing: every output
    complete, no partial files, and each equal to a clean run's."""
    make_folder(tmp_path / "in", 8)
    clean = infer(jax_cache, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "clean"),
                  "--batch-size", "2")
    assert clean.wait(600) == 0, clean.stderr.read().decode()
    run = infer(jax_cache, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                "--batch-size", "2", "--png-compression", "0")
    deadline = time.time() + 600
    while not list((tmp_path / "out").glob("*.png")) and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait(60)
    first = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert 0 < len(first) < 8
    again = infer(jax_cache, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                  "--batch-size", "2", "--skip-existing")
    assert again.wait(600) == 0, again.stderr.read().decode()
    assert "8 image(s)" in again.stdout.read().decode()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "clean").iterdir())
    for name in names:
        got, want = (np.asarray(Image.open(tmp_path / d / name), np.int32)
                     for d in ("out", "clean"))
        assert np.abs(got - want).max() <= 1, name


def test_shards_are_disjoint_and_cover_the_folder(tmp_path, monkeypatch):
    make_folder(tmp_path / "in", 7)
    parts = [set(folder_of("-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                           "--shard", f"{k}/3").inputs) for k in range(3)]
    assert sum(map(len, parts)) == 7 and len(set.union(*parts)) == 7
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert set(folder_of("-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")).inputs) \
        == parts[2]
    with pytest.raises(ValueError, match="--shard 3/3"):
        folder_of("-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--shard", "3/3")


def test_recursive_mirrors_subfolders(tmp_path):
    make_folder(tmp_path / "in", 1)
    make_folder(tmp_path / "in" / "trip" / "day1", 2, seed=1)
    folder = folder_of("-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--recursive",
                       "--format", "webp")
    assert sorted(o.relative_to(tmp_path / "out").as_posix() for o in folder.outputs.values()) \
        == ["photo00.webp", "trip/day1/photo00.webp", "trip/day1/photo01.webp"]
    assert len(folder_of("-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")).inputs) == 1


def test_files_that_are_not_ours_are_never_overwritten(tmp_path, capsys):
    make_folder(tmp_path / "in", 3)
    (tmp_path / "out").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "out" / "photo00.png")  # someone else's
    save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "out" / "photo01.png")  # ours
    left = _partial_name(tmp_path / "out" / "photo02.png").with_suffix(".123.partial")
    left.write_bytes(b"left by a killed run")  # as from another process, killed
    folder = folder_of("-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                       "--skip-existing")
    assert sorted(folder.inputs) == ["photo02.png"] and folder.failed == 1 and folder.done == 1
    assert "photo00.png exists and is not an output of ours" in capsys.readouterr().err
    assert not is_output(tmp_path / "out" / "photo00.png")
    assert not left.exists()


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_formats_carry_the_icc_profile(tmp_path, fmt):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "in" / "p3.png", icc_profile=profile)
    assert command.main([*TINY, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                         "--format", fmt, "--quality", "90",
                         "--cache-dir", str(tmp_path / "cache")]) == 0
    with Image.open(tmp_path / "out" / f"p3.{fmt}") as im:
        assert im.format == {"jpg": "JPEG", "webp": "WEBP"}[fmt] and im.size == (128, 128)
        assert im.info.get("icc_profile") == profile
        assert im.getexif().get(0x0131) == MARK
