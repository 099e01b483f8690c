"""``tsdsr-convert`` (or ``tsdsr-convert``): the official SD3 + TSD-SR files -> one model
directory.

    tsdsr-convert --sd3 SD3_DIR [--lora LORA_DIR] [--teacher-lora FILE] \\
        [--embeddings EMB_DIR] [--null-embeddings EMB_DIR] [--lpips-backbone FILE] \\
        --out MODEL_DIR [--dtype bf16]

Every input is checked before anything is written; every problem is reported, and the command
exits non-zero leaving no MODEL_DIR behind. Tensors are streamed one at a time from memory maps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from tsdsr_jax import cli
from tsdsr_jax.conversion.embeddings import read_embeddings
from tsdsr_jax.conversion.lora import plan_adapter
from tsdsr_jax.conversion.lpips import plan_lpips
from tsdsr_jax.conversion.sd3 import plan_weights, read_network
from tsdsr_jax.conversion.torch_layout import ConversionError, OutputFile
from tsdsr_jax.io import model_dir
from tsdsr_jax.models import PRECISIONS
from tsdsr_jax.models.targets import STUDENT_TARGETS, vae_encoder_targets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="tsdsr-convert", description=__doc__.split("\n")[0])
    p.add_argument("--sd3", type=Path, required=True,
                   help="diffusers SD3 folder (with transformer/ and vae/)")
    p.add_argument("--lora", type=Path,
                   help="folder with the official transformer.safetensors and vae.safetensors")
    p.add_argument("--teacher-lora", type=Path, help="the official teacher LoRA file")
    p.add_argument("--embeddings", type=Path,
                   help="folder with the default prompt's prompt_embeds.pt and pool_embeds.pt")
    p.add_argument("--null-embeddings", type=Path,
                   help="folder with the null prompt's prompt_embeds.pt and pool_embeds.pt")
    p.add_argument("--lpips-backbone", type=Path,
                   help="torchvision ImageNet alexnet-*.pth or vgg16-*.pth, for LPIPS "
                        "(heads from the lpips package)")
    p.add_argument("--out", type=Path, required=True, help="the model directory to write")
    p.add_argument("--dtype", choices=PRECISIONS, default="bf16",
                   help="dtype of the frozen SD3 weights (adapters stay float32)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[list[OutputFile], dict, list[str]]:
    """Checks every input; returns the files to write, config.json's fields, and the problems."""
    problems: list[str] = []

    def attempt(fn, *a):
        try:
            return fn(*a)
        except ConversionError as e:
            problems.append(str(e))
            return None

    if args.out.exists() and not args.force:
        problems.append(f"{args.out}: exists (pass --force to replace it)")
    if not args.sd3.is_dir():
        return [], {}, problems + [f"{args.sd3}: not a folder"]
    transformer = attempt(read_network, args.sd3, "transformer")
    vae = attempt(read_network, args.sd3, "vae")
    files = [attempt(plan_weights, args.sd3, net, PRECISIONS[args.dtype])
             for net in (transformer, vae) if net]
    adapters: dict[str, dict] = {}

    def adapter(name, file, network, targets):
        planned = attempt(plan_adapter, file, name, network.abstract, targets)
        if planned:
            adapters[name] = {"rank": planned[0], "targets": list(targets), "source": str(file)}
            files.append(planned[1])

    if transformer and args.lora:
        adapter("student", args.lora / "transformer.safetensors", transformer, STUDENT_TARGETS)
    if vae and args.lora:
        adapter("student_vae", args.lora / "vae.safetensors", vae,
                vae_encoder_targets(vae.abstract))
    if transformer and args.teacher_lora:
        adapter("teacher", args.teacher_lora, transformer, STUDENT_TARGETS)
    embeddings: dict[str, np.ndarray] = {}
    for prompt, folder in (("default", args.embeddings), ("null", args.null_embeddings)):
        if transformer and folder:
            got = attempt(read_embeddings, folder, transformer.config.joint_attention_dim,
                          transformer.config.pooled_projection_dim)
            embeddings.update({f"{prompt}.{k}": v for k, v in (got or {}).items()})
    lpips = attempt(plan_lpips, args.lpips_backbone) if args.lpips_backbone else None
    if lpips:
        files.append(lpips[0])
    files = [f for f in files if f]
    if embeddings:
        files.append(OutputFile(model_dir.EMBEDDINGS,
                                {k: (v.shape, np.dtype(np.float32)) for k, v in embeddings.items()},
                                embeddings.__getitem__))
    config = {"transformer": transformer and transformer.config, "vae": vae and vae.config,
              "adapters": adapters, "lpips": lpips and lpips[1]}
    return files, config, problems


def write(out: Path, files: list[OutputFile], config: dict, dtype: str) -> None:
    """Writes the model directory beside ``out`` and renames it into place when complete."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        for f in files:
            print(f"writing {out / f.name} ({len(f.specs)} tensors)", flush=True)
            f.write(tmp)
        model_dir.write_config(tmp / model_dir.CONFIG, config["transformer"], config["vae"],
                               config["adapters"], {"dtype": dtype}
                               | ({"lpips": config["lpips"]} if config["lpips"] else {}))
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files, config, problems = plan(args)
    if problems:
        print("error: cannot convert:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    write(args.out, files, config, args.dtype)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
