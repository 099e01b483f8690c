"""Training-data throughput on this machine's CPUs: batches per second of the grain pipeline.

    python bench/data.py [--samples 32] [--batch-size 2] [--batches 20] [--workers 0 2]

Writes a dataset of real photos (tests/data, resized to 512²) in the official layout, with
full-size SD3 tensors (prompt embeddings 333×4096, pooled 2048, HR latents 64×64×16) in our
safetensors format and in the official ``.pt`` format, then times the pipeline with the LR read
from ``lr_bicubic/`` and made on the fly by the Real-ESRGAN degradation; prints one table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tsdsr_jax.data.batches import DataConfig, train_batches
from tsdsr_jax.data.degrade import DegradeConfig
from tsdsr_jax.io.safetensors import save_arrays

PHOTOS = Path(__file__).resolve().parent.parent / "tests" / "data"


def make_dataset(root: Path, samples: int, official: bool) -> None:
    photos = [p for p in sorted(PHOTOS.iterdir()) if p.suffix in (".png", ".jpg")]
    rng = np.random.default_rng(0)
    for folder in ("gt", "lr_bicubic", "prompt_embeds", "pool_embeds", "latent_hr"):
        (root / folder).mkdir(parents=True)
    for n in range(samples):
        with Image.open(photos[n % len(photos)]) as im:
            hr = im.convert("RGB").resize((512, 512), Image.BICUBIC)
        hr.save(root / "gt" / f"{n:07d}.png")
        hr.resize((128, 128), Image.BICUBIC).resize((512, 512), Image.BICUBIC).save(
            root / "lr_bicubic" / f"{n:07d}.png")
        tensors = {"prompt_embeds": rng.standard_normal((333, 4096), np.float32),
                   "pool_embeds": rng.standard_normal(2048, np.float32),
                   "latent_hr": rng.standard_normal((64, 64, 16), np.float32)}
        for folder, array in tensors.items():
            if official:
                if folder == "latent_hr":
                    array = array.transpose(2, 0, 1)
                torch.save(torch.from_numpy(array[None].copy()), root / folder / f"{n:07d}.pt")
            else:
                save_arrays(root / folder / f"{n:07d}.safetensors", {folder: array})


def measure(config: DataConfig, batches: int) -> float:
    """Batches per second after two warm-up batches (worker start-up excluded)."""
    it = iter(train_batches(config))
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches / (time.perf_counter() - start)
    if hasattr(it, "close"):
        it.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"ours": Path(tmp) / "ours", "official .pt": Path(tmp) / "official"}
        for name, root in roots.items():
            make_dataset(root, args.samples, official=name != "ours")
        print(f"{os.cpu_count()} CPUs, batch {args.batch_size}, 512², "
              f"{args.batches} batches timed\n")
        print("| tensors | LR | workers | batches/s | images/s |")
        print("|---|---|---|---|---|")
        for name, root in roots.items():
            for degradation in (None, DegradeConfig()):
                for workers in args.workers:
                    config = DataConfig(roots=(root,), batch_size=args.batch_size,
                                        degradation=degradation, num_workers=workers,
                                        shard_index=0, shard_count=1)
                    rate = measure(config, args.batches)
                    lr = "lr_bicubic/" if degradation is None else "degraded on the fly"
                    print(f"| {name} | {lr} | {workers} | {rate:.2f} | "
                          f"{rate * args.batch_size:.1f} |", flush=True)


if __name__ == "__main__":
    main()
