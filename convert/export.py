"""``python -m convert.export``: a model directory's LoRA adapters -> the official TSD-SR files.

    python -m convert.export --model MODEL_DIR --out DIR

writes ``transformer.safetensors`` and ``vae.safetensors`` (the student), ``teacher.safetensors``
and ``transformer_reg.safetensors`` (the fake score) for the adapters the directory has, with
the official key names (``transformer.<module>.lora_A.weight``) and torch layouts, in float32,
so that the official PyTorch scripts load them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from convert.layout import OutputFile, to_torch, torch_name, torch_shape
from convert.lora import PREFIX
from tsdsr_jax import model_dir
from tsdsr_jax.safetensors_io import SafeTensors

OFFICIAL_FILES = {"student": "transformer.safetensors", "student_vae": "vae.safetensors",
                  "teacher": "teacher.safetensors", "fake_score": "transformer_reg.safetensors"}


def official_file(name: str, adapter: SafeTensors) -> OutputFile:
    """The official file of one adapter (our dotted names -> ``transformer.``-prefixed torch)."""
    paths = {PREFIX + torch_name(p): p for p in adapter}
    specs = {k: (torch_shape(p, adapter.shape(p)), np.dtype(np.float32))
             for k, p in paths.items()}
    return OutputFile(OFFICIAL_FILES[name], specs,
                      lambda k: to_torch(paths[k], np.asarray(adapter[paths[k]], np.float32)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--out", type=Path, required=True, help="folder for the official LoRA files")
    args = p.parse_args(argv)
    try:
        names = list(model_dir.read_config(args.model)["adapters"])
    except model_dir.ModelDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not names:
        print(f"error: {args.model} has no LoRA adapters to export", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        f = official_file(name, SafeTensors(args.model / model_dir.adapter_file(name)))
        f.write(args.out, metadata={"format": "pt"})
        print(f"wrote {args.out / f.name} ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
