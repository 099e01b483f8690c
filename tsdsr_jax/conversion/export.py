"""``tsdsr-export``: LoRA adapters -> the official TSD-SR files.

    tsdsr-export --model MODEL_DIR --out DIR
    tsdsr-export --checkpoint WORKDIR/checkpoints [--step N] --out DIR

writes ``transformer.safetensors`` and ``vae.safetensors`` (the student), ``teacher.safetensors``
and ``transformer_reg.safetensors`` (the fake score) for the adapters a model directory or a
training checkpoint has, with the official key names (``transformer.<module>.lora_A.weight``)
and torch layouts, in float32, so that the official PyTorch scripts load them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tsdsr_jax import cli
from tsdsr_jax.conversion.lora import PREFIX
from tsdsr_jax.conversion.torch_layout import OutputFile, to_torch, torch_name, torch_shape
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.safetensors import SafeTensors
from tsdsr_jax.io.tree import flatten
from tsdsr_jax.training.checkpoint import CheckpointError, read_state

OFFICIAL_FILES = {"student": "transformer.safetensors", "student_vae": "vae.safetensors",
                  "teacher": "teacher.safetensors", "fake_score": "transformer_reg.safetensors"}


def official_file(name: str, adapter: Mapping[str, np.ndarray]) -> OutputFile:
    """The official file of one adapter, given as ``{dotted leaf path: array}``."""
    paths = {PREFIX + torch_name(p): p for p in adapter}
    specs = {k: (torch_shape(p, np.shape(adapter[p])), np.dtype(np.float32))
             for k, p in paths.items()}
    return OutputFile(OFFICIAL_FILES[name], specs,
                      lambda k: to_torch(paths[k], np.asarray(adapter[paths[k]], np.float32)))


def model_adapters(path: Path) -> dict[str, Mapping[str, np.ndarray]]:
    """The adapters of a model directory, read lazily from their files."""
    names = model_dir.read_config(path)["adapters"]
    return {name: SafeTensors(path / model_dir.adapter_file(name)) for name in names}


def checkpoint_adapters(path: Path, step: int | None) -> dict[str, Mapping[str, np.ndarray]]:
    """The trained adapters of a training checkpoint: the student's and the fake score's (a
    TSD-SR run) or the teacher's (a teacher run)."""
    state = read_state(path, step)
    if "teacher" in state:
        return {"teacher": flatten(state["teacher"])}
    if not {"student", "fake_score"} <= set(state):
        raise CheckpointError(f"{path}: not the checkpoints of a train.py run")
    student = state["student"]
    return {"student": flatten(student["transformer"]), "student_vae": flatten(student["vae"]),
            "fake_score": flatten(state["fake_score"])}


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="tsdsr-export", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model directory")
    source.add_argument("--checkpoint", type=Path, help="a training run's checkpoints folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--out", type=Path, required=True, help="folder for the official LoRA files")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: not a folder")
    if args.step is not None and args.step < 0:
        p.error(f"--step {args.step}: must be >= 0")
    try:
        adapters = (model_adapters(args.model) if args.model
                    else checkpoint_adapters(args.checkpoint, args.step))
    except (model_dir.ModelDirError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not adapters:
        print(f"error: {args.model} has no LoRA adapters to export", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name, adapter in adapters.items():
        f = official_file(name, adapter)
        f.write(args.out, metadata={"format": "pt"})
        print(f"wrote {args.out / f.name} ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
