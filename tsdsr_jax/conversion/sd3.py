"""The SD3 base from a diffusers folder: the transformer and the VAE, streamed tensor by tensor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tsdsr_jax.conversion.torch_layout import ConversionError, OutputFile, plan_tree
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.safetensors import SafetensorsError, open_weights
from tsdsr_jax.io.tree import flatten
from tsdsr_jax.models import mmdit, vae

WEIGHTS_STEM = "diffusion_pytorch_model"


def _read_config(folder: Path, class_name: str) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise ConversionError(f"{file}: missing (is {folder.parent} a diffusers SD3 folder?)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file}: not JSON ({e})") from None
    if config.get("_class_name") != class_name:
        raise ConversionError(f"{file}: _class_name is {config.get('_class_name')!r}, "
                              f"expected {class_name!r} (not an SD3 folder)")
    return config


def _open_weights(folder: Path):
    try:
        return open_weights(folder, WEIGHTS_STEM)
    except SafetensorsError as e:
        raise ConversionError(str(e)) from None


@dataclasses.dataclass
class Network:
    """One network of the SD3 folder: its config and its abstract params (shapes)."""

    name: str
    config: Any
    abstract: Any


# network (its subfolder and our file name) -> (diffusers class, our module, config class)
_NETWORKS = {"transformer": ("SD3Transformer2DModel", mmdit, mmdit.MMDiTConfig),
             "vae": ("AutoencoderKL", vae, vae.VAEConfig)}
# Buffers diffusers saves that we recompute: the transformer's full position table.
_RECOMPUTED = {"transformer": ("pos_embed.pos_embed",), "vae": ()}


def read_network(sd3_dir: Path, name: str) -> Network:
    """Reads and checks ``sd3_dir/<name>/config.json``."""
    class_name, module, config_class = _NETWORKS[name]
    folder = sd3_dir / name
    raw = _read_config(folder, class_name)
    try:
        config = config_class.from_diffusers(raw)
    except ValueError as e:
        raise ConversionError(f"{folder / 'config.json'}: {e}") from None
    if name == "vae":
        # TSD-SR scales latents by scaling_factor alone; the official code applies no shift.
        config = dataclasses.replace(config, shift_factor=0.0)
    return Network(name, config, module.abstract_params(config))


def plan_weights(sd3_dir: Path, network: Network, dtype: Any) -> OutputFile:
    """Checks the network's weight files against its params and plans their conversion."""
    folder = sd3_dir / network.name
    weights = _open_weights(folder)
    kept = {k for k in weights if k not in _RECOMPUTED[network.name]}
    return plan_tree(model_dir.network_file(network.name), flatten(network.abstract),
                     weights, str(folder), dtype, keys=kept)
