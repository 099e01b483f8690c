"""One-step TSD-SR super-resolution of a photo or a folder of photos.

    tsdsr-infer --model MODEL_DIR -i INPUT -o OUTDIR [--color-fix wavelet|adain|none] ...
    tsdsr-infer --model tiny -i tests/data -o outputs     # no weights: a tiny random model

MODEL_DIR comes from `tsdsr-convert`. Outputs are PNGs named after the inputs. Unreadable
inputs are reported and skipped; the exit code is then non-zero.
"""

from __future__ import annotations

import argparse
import sys
import time
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
    failed = 0
    names = output_names(paths)
    loaded: list[tuple[Path, np.ndarray]] = []
    for path in paths:
        out = args.output / names[path]
        if out.resolve() == path.resolve():
            print(f"error: {path}: its output {out} would overwrite the input; skipped",
                  file=sys.stderr)
            failed += 1
            continue
        try:
            loaded.append((path, load_image(path)))
        except ImageError as e:
            print(f"error: {e}; skipped", file=sys.stderr)
            failed += 1
    with tqdm(total=len(loaded), unit="img") as bar:
        tic = time.perf_counter()
        for batch in pipe.batches(loaded, args.batch_size, args.seed):
            for path, lr, out in batch:
                save_png(out, args.output / names[path])
                if args.compare:
                    up = np.kron(lr, np.ones((args.upscale, args.upscale, 1), np.uint8))
                    save_png(np.concatenate([up, out], axis=1),
                             args.output / "compare" / names[path])
            toc = time.perf_counter()
            bar.set_postfix_str(f"{(toc - tic) * 1000 / len(batch):.0f} ms/img")
            bar.update(len(batch))
            tic = toc
    print(f"wrote {len(paths) - failed} image(s) to {args.output}"
          + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
