"""One-step TSD-SR super-resolution of a photo or a folder of photos.

    tsdsr-infer --model MODEL_DIR -i INPUT -o OUTDIR [--color-fix wavelet|adain|none] ...
    tsdsr-infer --model tiny -i tests/data -o outputs     # no weights: a tiny random model

MODEL_DIR comes from `tsdsr-convert`. Outputs are named after the inputs (subfolders mirrored
with --recursive). Unreadable inputs, inputs above --max-pixels, results that fail, and files in
the way that are not our outputs are reported and skipped.

Exit codes: 0 all done; 1 some inputs failed (each named); 2 a bad flag or model (before
anything compiles); 74 the output disk is full (or failing): the run stops; 130 (Ctrl-C) and
143 (SIGTERM) stopped after the batch in flight. Each but 0 ends with a summary of how many
were written and how many remain; the same command with --skip-existing does the rest.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from tsdsr_jax import cli
from tsdsr_jax.inference.canvas import SizeClass
from tsdsr_jax.inference.pipeline import Pipeline, attention_impl
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.images import (
    FORMATS,
    ImageError,
    is_output,
    list_images,
    load_photo,
    output_names,
    partials,
    save_image,
)
from tsdsr_jax.models import set_matmul_precision
from tsdsr_jax.models.mmdit import not_runnable_here
from tsdsr_jax.sharding import ShardingConfig, make_mesh

DISK_FULL = 74  # EX_IOERR
# Write errors that no later output escapes: the run stops at the first.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
MAX_PIXELS = 4096 * 4096


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="model directory from `tsdsr-convert`, or 'tiny' (random weights)")
    p.add_argument("-i", "--input", type=Path, required=True, help="an image or a folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--recursive", action="store_true",
                   help="also the images in -i's subfolders (mirrored in the output folder)")
    p.add_argument("--format", choices=sorted(FORMATS), default="png")
    p.add_argument("--quality", type=int, default=95, help="jpg and webp quality (1-100)")
    p.add_argument("--png-compression", type=int, default=6,
                   help="PNG compression level (0-9): lower writes faster, larger files")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="inputs of more pixels are refused, by name, before they are decoded "
                        f"(default {MAX_PIXELS:,}: 4096x4096)")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave outputs that a run of ours already wrote; do the rest")
    p.add_argument("--shard", type=str, default=None,
                   help="K/N: only the K-th (from 0) of N disjoint parts of the sorted inputs "
                        "(default under SLURM: this task's)")
    p.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default="wavelet")
    p.add_argument("--vae", choices=["sample", "mean"], default="sample",
                   help="posterior sample (official) or its mean (deterministic)")
    p.add_argument("--seed", type=cli.seed, default=42)
    cli.add_network_flags(p)
    p.add_argument("--compare", action="store_true",
                   help="also write OUTDIR/compare/NAME: LR (nearest) | SR")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads that decode the inputs and encode the outputs")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tsdsr_jax",
                   help="JAX's persistent compilation cache")
    return p.parse_args(argv)


def shard_of(text: str | None) -> tuple[int, int]:
    """``--shard K/N`` as (K, N); by default SLURM's task of the job step, else (0, 1)."""
    if text is None:
        k, n = os.environ.get("SLURM_PROCID", "0"), os.environ.get("SLURM_NTASKS", "1")
        where = f"SLURM_PROCID={k} SLURM_NTASKS={n}"
    else:
        (k, _, n), where = text.partition("/"), f"--shard {text}"
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise ValueError(f"{where}: must be K/N with 0 <= K < N")
    return int(k), int(n)


def check(args: argparse.Namespace) -> None:
    """The flags that no config checks; a ValueError names the flag."""
    if args.input.is_dir() and args.output.resolve() == args.input.resolve():
        raise ValueError(f"{args.output}: write the outputs to another folder than the inputs")
    for folder in (args.output, *args.output.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"-o {args.output}: {folder} is not a folder")
            break
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be at least 1")
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels {args.max_pixels}: must be at least 1")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality {args.quality}: must be 1 to 100")
    if not 0 <= args.png_compression <= 9:
        raise ValueError(f"--png-compression {args.png_compression}: must be 0 to 9")
    if args.devices > len(jax.local_devices()):
        raise ValueError(f"--devices {args.devices}: this host has {len(jax.local_devices())}")


def load_model(name: str) -> model_dir.Model:
    if name == "tiny":
        print("note: --model tiny is a small RANDOM model: its outputs show the pipeline "
              "working, not super-resolution. Convert the real weights with `tsdsr-convert`.")
        return model_dir.tiny()
    return model_dir.load(name)


class Folder:
    """The inputs of this run (this shard's), where each one's output goes, and what is in
    the way. Keys are paths relative to -i: an image's noise derives from the seed and its
    key alone, so its output depends neither on the folder nor on the batch."""

    def __init__(self, args: argparse.Namespace):
        paths = list_images(args.input, exclude=args.output, recursive=args.recursive)
        k, n = shard_of(args.shard)
        self.root = args.input if args.input.is_dir() else args.input.parent
        self.max_pixels = args.max_pixels
        names = output_names(paths, self.root if args.recursive else None, "." + args.format)
        self.inputs: dict[str, Path] = {}
        self.outputs: dict[str, Path] = {}
        self.done = self.failed = 0      # outputs there (written or kept); inputs skipped
        self.finished: set[str] = set()  # inputs of this run written or failed
        self.fatal: str | None = None    # why the run must stop (the disk)
        self._lock = threading.Lock()  # the writer threads count too
        for path in paths[k::n]:
            key, out = path.relative_to(self.root).as_posix(), args.output / names[path]
            if out.exists() and out.resolve() == path.resolve():
                self.fail(f"{path}: its output {out} would overwrite the input")
            elif out.exists() and not is_output(out):
                self.fail(f"{path}: {out} exists and is not an output of ours; not overwritten")
            elif out.exists() and args.skip_existing:
                self.done += 1
            else:
                self.inputs[key], self.outputs[key] = path, out
        for partial in partials(self.outputs.values()):  # what a killed run left
            partial.unlink(missing_ok=True)

    def fail(self, message: str, key: str | None = None) -> None:
        tqdm.write(f"error: {message}; skipped", file=sys.stderr)
        with self._lock:
            self.failed += 1
            if key is not None:
                self.finished.add(key)

    def wrote(self, key: str) -> None:
        with self._lock:
            self.done += 1
            self.finished.add(key)

    def stop(self, message: str) -> None:
        """Ends the run at the next batch, for ``message`` (said once)."""
        with self._lock:
            if self.fatal is None:
                self.fatal = message
                tqdm.write(f"error: {message}", file=sys.stderr)

    def summary(self, output: Path) -> str:
        text = f"{self.done} image(s) in {output}"
        if self.failed:
            text += f"; {self.failed} failed"
        remain = len(self.inputs) - len(self.finished)
        return text + (f"; {remain} not done" if remain else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = cli.inference_config(args, color_fix=args.color_fix, vae_posterior=args.vae)
        check(args)
        if why := not_runnable_here(config.attention_impl):
            raise ValueError(f"--attention {config.attention_impl}: {why}; use --attention xla")
        if note := attention_impl(config)[1]:
            print(note, file=sys.stderr)
        set_matmul_precision(args.matmul_precision)
        folder = Folder(args)
        mesh = None
        if args.devices > 1:
            mesh = make_mesh(ShardingConfig(data=args.devices), jax.local_devices()[:args.devices])
        jax.config.update("jax_compilation_cache_dir", str(args.cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        pipe = Pipeline(load_model(args.model), config, mesh)
    except (ImageError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        print("interrupted: nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
    stop: list[int] = []  # the signals received

    def handle(signum: int, frame) -> None:
        del frame
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: at once
        stop.append(signum)
        tqdm.write(f"{signal.Signals(signum).name}: stopping after the batch in flight (a "
                   "second Ctrl-C stops at once)", file=sys.stderr)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(args, folder, pipe, stop)
    except KeyboardInterrupt:
        stop.append(signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    again = " with --skip-existing" if not args.skip_existing else ""
    if folder.fatal:
        print(f"stopped: {folder.summary(args.output)}; free some space, then run the same "
              f"command{again}", file=sys.stderr)
        return DISK_FULL
    if stop:
        print(f"stopped by {signal.Signals(stop[0]).name}: {folder.summary(args.output)}; "
              f"run the same command{again} to finish", file=sys.stderr)
        return 128 + stop[0]
    print(folder.summary(args.output))
    return 1 if folder.failed else 0


def run(args: argparse.Namespace, folder: Folder, pipe: Pipeline, stop: list) -> None:
    """Decodes, super-resolves and writes ``folder``'s inputs until done or ``stop``."""
    profiles: dict[str, bytes | None] = {}

    def compiling(cls: SizeClass) -> None:
        tqdm.write(f"compiling for size class {cls} (batch {args.batch_size}): its first "
                   "batch waits for the compile")

    with ThreadPoolExecutor(args.workers) as pool, \
            tqdm(total=len(folder.inputs), unit="img") as bar:
        photos = _decoded(pool, folder, profiles, 2 * args.workers + 2 * args.batch_size, stop)
        writing: deque[Future] = deque()
        tic = time.perf_counter()
        for batch in pipe.batches(photos, args.batch_size, args.seed, on_compile=compiling):
            for result in batch:
                icc = profiles.pop(result.key)
                if result.problem:
                    folder.fail(f"{folder.inputs[result.key]}: {result.problem}", result.key)
                    continue
                writing.append(pool.submit(_write, args, folder, result.key, result.lr,
                                           result.sr, icc))
            while len(writing) > 2 * args.workers:  # the writers keep up, or the device waits
                writing.popleft().result()
            toc = time.perf_counter()
            bar.set_postfix_str(f"{(toc - tic) * 1000 / len(batch):.0f} ms/img")
            bar.update(len(batch))
            tic = toc
            if stop or folder.fatal:
                break
        for future in writing:
            future.result()


def _decoded(pool: ThreadPoolExecutor, folder: Folder, profiles: dict[str, bytes | None],
             ahead: int, stop: list) -> Iterator[tuple[str, np.ndarray]]:
    """``folder``'s inputs as ``(key, uint8 image)``, decoded by ``pool`` at most ``ahead``
    ahead of their use (their ICC profiles into ``profiles``); unreadable ones are reported
    and left out. Ends early once ``stop`` is set."""
    pending: deque[tuple[str, Future]] = deque()
    items = iter(folder.inputs.items())
    while not stop:
        for key, path in items:
            pending.append((key, pool.submit(load_photo, path, folder.max_pixels)))
            if len(pending) >= ahead:
                break
        if not pending:
            return
        key, future = pending.popleft()
        try:
            photo = future.result()
        except ImageError as e:
            folder.fail(str(e), key)
            continue
        profiles[key] = photo.icc_profile
        yield key, photo.pixels


def _write(args: argparse.Namespace, folder: Folder, key: str, lr: np.ndarray, sr: np.ndarray,
           icc: bytes | None) -> None:
    """Writes one output (and its comparison), carrying the input's ICC profile; a full or
    failing disk stops the run."""
    out = folder.outputs[key]
    if folder.fatal:
        return
    options = dict(quality=args.quality, compress_level=args.png_compression, icc_profile=icc)
    try:
        save_image(sr, out, **options)
        if args.compare:
            up = np.kron(lr, np.ones((args.upscale, args.upscale, 1), np.uint8))
            save_image(np.concatenate([up, sr], axis=1),
                       args.output / "compare" / out.relative_to(args.output), **options)
    except OSError as e:
        if e.errno in DISK_ERRORS:
            folder.stop(f"cannot write {out}: {e.strerror}")
        else:
            folder.fail(f"{folder.inputs[key]}: cannot write {out} ({e.strerror or e})", key)
        return
    folder.wrote(key)


if __name__ == "__main__":
    sys.exit(main())
