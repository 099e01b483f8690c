"""LoRA adapters from the official TSD-SR files (``StableDiffusion3Pipeline.save_lora_weights``
format: ``transformer.<module>.lora_A.weight``, also for the VAE file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from tsdsr_jax.conversion.torch_layout import ConversionError, OutputFile, plan_tree
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.safetensors import SafeTensors, SafetensorsError
from tsdsr_jax.models.lora import adapter_shapes

PREFIX = "transformer."


def plan_adapter(file: Path, name: str, base: Any, targets: tuple[str, ...]
                 ) -> tuple[int, OutputFile]:
    """Reads an official LoRA file for the base tree ``base`` (abstract params) adapted at
    ``targets``; returns the rank and the adapter file to write (float32)."""
    if not file.is_file():
        raise ConversionError(f"{file}: missing")
    try:
        tensors = SafeTensors(file)
    except SafetensorsError as e:
        raise ConversionError(str(e)) from None
    ranks = {tensors.shape(k)[0] for k in tensors if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise ConversionError(f"{file}: expected LoRA tensors of one rank "
                              f"(`*.lora_A.weight`), found ranks {sorted(ranks) or 'none'}")
    (rank,) = ranks
    expected = {}
    for path, (shape_a, shape_b) in adapter_shapes(base, targets, rank).items():
        expected[path + ".lora_A"] = jax.ShapeDtypeStruct(shape_a, np.float32)
        expected[path + ".lora_B"] = jax.ShapeDtypeStruct(shape_b, np.float32)
    return rank, plan_tree(model_dir.adapter_file(name), expected, tensors, str(file),
                           np.float32, PREFIX)
