"""Prompt embeddings from the official ``prompt_embeds.pt`` / ``pool_embeds.pt`` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tsdsr_jax.conversion.torch_layout import ConversionError

FILES = {"prompt_embeds": "prompt_embeds.pt", "pooled_prompt_embeds": "pool_embeds.pt"}


def _load_tensor(file: Path) -> np.ndarray:
    import torch  # only the converter needs torch, to read the official .pt files

    if not file.is_file():
        raise ConversionError(f"{file}: missing")
    try:
        value = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad or unsafe pickle
        raise ConversionError(f"{file}: not a loadable torch tensor file ({e})") from None
    if not isinstance(value, torch.Tensor):
        raise ConversionError(f"{file}: holds a {type(value).__name__}, expected a tensor")
    return value.detach().float().numpy()


def read_embeddings(folder: Path, joint_dim: int, pooled_dim: int) -> dict[str, np.ndarray]:
    """``{'prompt_embeds': (L, joint_dim), 'pooled_prompt_embeds': (pooled_dim,)}`` of one
    prompt, from a folder holding the two official files (each with a batch axis of 1)."""
    want = {"prompt_embeds": f"(1, L, {joint_dim})", "pooled_prompt_embeds": f"(1, {pooled_dim})"}
    found, problems = {}, []
    for field, name in FILES.items():
        try:
            value = _load_tensor(folder / name)
        except ConversionError as e:
            problems.append(str(e))
            continue
        ok = (value.ndim == 3 and value.shape[0] == 1 and value.shape[2] == joint_dim
              if field == "prompt_embeds" else value.shape == (1, pooled_dim))
        if ok:
            found[field] = value[0]
        else:
            problems.append(f"{folder / name}: shape {value.shape}, expected {want[field]}")
    if problems:
        raise ConversionError("\n".join(problems))
    return found
