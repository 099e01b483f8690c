"""Folders of real photos on this host: compiles per size class, memory against folder size,
the host's own decode/encode/write ceiling, and what the size classes cost in padding.

    .venv/bin/python bench/folders.py [--skip compile,memory,host,classes]

Prints one table per part (bench/RESULTS.md, "Folders"). The compile and memory parts run the
tiny random model on the CPU (fp32); the host part leaves the device step out.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from tsdsr_jax.inference.canvas import Classes
from tsdsr_jax.inference.pipeline import InferenceConfig, Pipeline
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.images import load_photo, save_image
from tsdsr_jax.models.mmdit import MMDiTConfig

ROOT = Path(__file__).parent.parent
RATIOS = [(4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3), (1, 1), (5, 4), (21, 9)]


def phone_and_web_sizes(n: int, longest: int = 512, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` LR sizes of nine aspect ratios, long side 128 to ``longest`` (outputs up to
    ``4·longest``), short side at least 64."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        a, b = RATIOS[i % len(RATIOS)]
        long = int(rng.integers(128, longest + 1))
        h, w = (long, long * b // a) if a >= b else (long * a // b, long)
        sizes.append((max(h, 64), max(w, 64)))
    return sizes


def compile_seconds() -> list[float]:
    """A list that collects the backend compile time of every compile from now on."""
    seconds: list[float] = []

    def listen(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            seconds.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    return seconds


def compiles() -> None:
    print("\n| 16 photos (tiny model, LR 32-63 px, batch 1) | programs | compile s | total s |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(1)
    distinct = [(int(h), int(w)) for h, w in rng.integers(32, 64, (16, 2))]
    seconds = compile_seconds()
    for name, sizes, steps in (("16 sizes, a program per size", distinct, 0),
                               ("16 sizes, size classes", distinct, 2),
                               ("one size", [(48, 40)] * 16, 2)):
        pipe = Pipeline(model_dir.tiny(), InferenceConfig(process_size=128, precision="fp32",
                                                          size_class_steps=steps))
        images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
        programs = len({pipe.size_class(*s) for s in sizes})
        seconds.clear()
        tic = time.perf_counter()
        pipe(images)
        total = time.perf_counter() - tic
        print(f"| {name} | {programs} | {sum(seconds):.1f} | {total:.1f} |", flush=True)


def memory() -> None:
    print("\n| photos in the folder (LR 32x40, batch 8) | peak RSS MB |")
    print("|---|---|")
    for n in (40, 800):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "in"
            folder.mkdir()
            rng = np.random.default_rng(0)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
                    folder / f"{i:04d}.png")
            code = ("import resource, sys; from tsdsr_jax.inference import command; "
                    "command.main(sys.argv[1:]); "
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
            out = subprocess.run(
                [sys.executable, "-c", code, "--model", "tiny", "--precision", "fp32",
                 "--process-size", "128", "-i", str(folder), "-o", str(Path(tmp) / "out"),
                 "--batch-size", "8", "--cache-dir", str(Path(tmp) / "cache")],
                cwd=ROOT, capture_output=True, text=True, check=True)
            print(f"| {n} | {out.stdout.split()[-1]} |", flush=True)


def host() -> None:
    print("\n| output | PNG level | threads | decode + encode + write, images/s |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for side in (512, 1024, 2048):
            lr_path = Path(tmp) / f"lr{side}.jpg"
            Image.fromarray(rng.integers(0, 256, (side // 4, side // 4, 3),
                                         dtype=np.uint8)).save(lr_path, quality=90)
            # a photo-like output (smooth, with noise) compresses as real outputs do
            y, x = np.mgrid[:side, :side] / side
            sr = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y), np.sin(9 * x * y)], -1)
            sr = np.clip((sr + 1) * 110 + rng.normal(0, 6, sr.shape), 0, 255).astype(np.uint8)
            for level in (6, 1):
                for threads in (1, 2):
                    count = max(4, 64 * 512 * 512 // side ** 2)

                    def one(i: int) -> None:
                        load_photo(lr_path)
                        save_image(sr, Path(tmp) / f"out{i}.png", compress_level=level)

                    with ThreadPoolExecutor(threads) as pool:
                        tic = time.perf_counter()
                        list(pool.map(one, range(count)))
                        rate = count / (time.perf_counter() - tic)
                    print(f"| {side}² | {level} | {threads} | {rate:.1f} |", flush=True)


def classes() -> None:
    print("\n| 100 phone and web sizes (x4 to at most 2048) | programs | padded pixels, mean "
          "| max |")
    print("|---|---|---|---|")
    sizes = phone_and_web_sizes(100)
    for steps in (0, 2, 3, 4):
        c = Classes(4, 512, 64, 8, MMDiTConfig.sd3_medium(), steps)
        pad = [c.padded_fraction(s) for s in sizes]
        print(f"| --size-classes {steps} | {len({c.of(s) for s in sizes})} "
              f"| {np.mean(pad):+.0%} | {np.max(pad):+.0%} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip", default="", help="parts to leave out, comma-separated")
    skip = set(p.parse_args().skip.split(","))
    for name, part in (("classes", classes), ("host", host), ("memory", memory),
                       ("compile", compiles)):
        if name not in skip:
            part()


if __name__ == "__main__":
    main()
