"""One-step TSD-SR super-resolution of a photo or a folder of photos.

    tsdsr-infer --model MODEL_DIR -i INPUT -o OUTDIR [--color-fix wavelet|adain|none] ...
    tsdsr-infer --model tiny -i tests/data -o outputs     # no weights: a tiny random model

MODEL_DIR comes from `tsdsr-convert`. Outputs are PNGs named after the inputs. Unreadable
inputs are reported and skipped; the exit code is then non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from tsdsr_jax import cli
from tsdsr_jax.inference.pipeline import Pipeline
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.images import ImageError, list_images, load_image, output_names, save_png
from tsdsr_jax.models.mmdit import runnable_here
from tsdsr_jax.sharding import ShardingConfig, make_mesh


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="model directory from `tsdsr-convert`, or 'tiny' (random weights)")
    p.add_argument("-i", "--input", type=Path, required=True, help="an image or a folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default="wavelet")
    p.add_argument("--vae", choices=["sample", "mean"], default="sample",
                   help="posterior sample (official) or its mean (deterministic)")
    p.add_argument("--seed", type=cli.seed, default=42)
    cli.add_network_flags(p)
    p.add_argument("--compare", action="store_true",
                   help="also write OUTDIR/compare/NAME.png: LR (nearest) | SR")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads that decode the inputs and encode the outputs")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tsdsr_jax",
                   help="JAX's persistent compilation cache")
    return p.parse_args(argv)


def load_model(name: str) -> model_dir.Model:
    if name == "tiny":
        print("note: --model tiny is a small RANDOM model: its outputs show the pipeline "
              "working, not super-resolution. Convert the real weights with `tsdsr-convert`.")
        return model_dir.tiny()
    return model_dir.load(name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = cli.inference_config(args, color_fix=args.color_fix, vae_posterior=args.vae)
        if args.input.is_dir() and args.output.resolve() == args.input.resolve():
            raise ValueError(f"{args.output}: write the outputs to another folder than the inputs")
        if args.output.exists() and not args.output.is_dir():
            raise ValueError(f"-o {args.output}: not a folder")
        if args.workers < 1:
            raise ValueError(f"--workers {args.workers}: must be at least 1")
        if args.devices > len(jax.local_devices()):
            raise ValueError(f"--devices {args.devices}: this host has "
                             f"{len(jax.local_devices())}")
        if not runnable_here(config.attention_impl):
            raise ValueError(f"--attention cudnn: needs a GPU (jax runs on "
                             f"{jax.default_backend()} here); use --attention xla")
        paths = list_images(args.input, exclude=args.output)
        mesh = None
        if args.devices > 1:
            mesh = make_mesh(ShardingConfig(data=args.devices), jax.local_devices()[:args.devices])
        jax.config.update("jax_compilation_cache_dir", str(args.cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        pipe = Pipeline(load_model(args.model), config, mesh)
    except (ImageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = output_names(paths)
    jobs = []
    for path in paths:
        if (args.output / names[path]).resolve() == path.resolve():
            print(f"error: {path}: its output {args.output / names[path]} would overwrite the "
                  "input; skipped", file=sys.stderr)
        else:
            jobs.append(path)
    # an image's noise derives from the seed and its path relative to -i: its output does not
    # depend on the folder it is in or on its batch
    root = args.input if args.input.is_dir() else args.input.parent
    keys = {path.relative_to(root).as_posix(): path for path in jobs}
    written = 0
    with ThreadPoolExecutor(args.workers) as pool, \
            tqdm(total=len(jobs), unit="img") as bar:
        decoding = _decoded(pool, keys, 2 * args.workers + 2 * args.batch_size)
        writing: deque[Future] = deque()
        tic = time.perf_counter()
        for batch in pipe.batches(decoding, args.batch_size, args.seed):
            for key, lr, out in batch:
                writing.append(pool.submit(_write, args, keys[key], names[keys[key]], lr, out))
            while len(writing) > 2 * args.workers:  # the writers keep up, or the device waits
                written += writing.popleft().result()
            toc = time.perf_counter()
            bar.set_postfix_str(f"{(toc - tic) * 1000 / len(batch):.0f} ms/img")
            bar.update(len(batch))
            tic = toc
        written += sum(f.result() for f in writing)
    failed = len(paths) - written
    print(f"wrote {written} image(s) to {args.output}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def _decoded(pool: ThreadPoolExecutor, keys: dict[str, Path], ahead: int
             ) -> Iterator[tuple[str, np.ndarray]]:
    """The images of ``keys`` as ``(key, uint8 image)``, decoded by ``pool`` at most ``ahead``
    ahead of their use; unreadable ones are reported and left out."""
    pending: deque[tuple[str, Future]] = deque()
    items = iter(keys.items())
    while True:
        for key, path in items:
            pending.append((key, pool.submit(load_image, path)))
            if len(pending) >= ahead:
                break
        if not pending:
            return
        key, future = pending.popleft()
        try:
            yield key, future.result()
        except ImageError as e:
            print(f"error: {e}; skipped", file=sys.stderr)


def _write(args: argparse.Namespace, path: Path, name: str, lr: np.ndarray, out: np.ndarray
           ) -> int:
    """Writes one output (and its comparison); 1 when written."""
    try:
        save_png(out, args.output / name)
        if args.compare:
            up = np.kron(lr, np.ones((args.upscale, args.upscale, 1), np.uint8))
            save_png(np.concatenate([up, out], axis=1), args.output / "compare" / name)
    except OSError as e:
        print(f"error: {path}: cannot write {args.output / name} ({e})", file=sys.stderr)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
