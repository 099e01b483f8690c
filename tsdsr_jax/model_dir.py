"""The model directory that ``python -m convert`` writes and everything else loads.

::

    MODEL_DIR/
      config.json                  format, transformer and VAE configs, adapters, latent scaling
      transformer.safetensors      frozen SD3 MMDiT (our tree's dotted names and layouts)
      vae.safetensors              frozen SD3 VAE
      adapter_<name>.safetensors   LoRA adapters in float32: student (transformer), student_vae,
                                   teacher, fake_score, as present
      embeddings.safetensors       <prompt>.prompt_embeds (L, 4096), <prompt>.pooled_prompt_embeds
                                   (2048,) for the prompts present: default, null
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.models.mmdit import MMDiTConfig
from tsdsr_jax.models.mmdit import abstract_params as mmdit_abstract_params
from tsdsr_jax.models.vae import VAEConfig
from tsdsr_jax.models.vae import abstract_params as vae_abstract_params
from tsdsr_jax.safetensors_io import SafeTensors, SafetensorsError
from tsdsr_jax.tree import flatten, nest

FORMAT = "tsdsr-jax-model"
VERSION = 1
CONFIG = "config.json"
EMBEDDINGS = "embeddings.safetensors"
# Which network each adapter adapts.
ADAPTER_NETWORKS = {"student": "transformer", "student_vae": "vae", "teacher": "transformer",
                    "fake_score": "transformer"}


def network_file(network: str) -> str:
    return f"{network}.safetensors"


def adapter_file(name: str) -> str:
    return f"adapter_{name}.safetensors"


class ModelDirError(ValueError):
    """A model directory that cannot be loaded; the message names the file and the problem."""


@dataclasses.dataclass
class Model:
    """A loaded model directory: configs, frozen params, LoRA adapters and prompt embeddings."""

    path: Path
    transformer_config: MMDiTConfig
    vae_config: VAEConfig
    params: dict[str, Any]                  # {'transformer': tree, 'vae': tree}
    adapters: dict[str, Any]                # {'student': tree, 'student_vae': tree, ...}
    embeddings: dict[str, dict[str, jax.Array]]  # {'default': {'prompt_embeds': ...}, ...}


def write_config(path: Path, transformer: MMDiTConfig, vae: VAEConfig,
                 adapters: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """Writes ``config.json``; ``adapters`` maps each adapter name to ``{'rank': r, ...}``."""
    config = {"format": FORMAT, "version": VERSION, "transformer": transformer.to_dict(),
              "vae": vae.to_dict(), "adapters": adapters, **(extra or {})}
    path.write_text(json.dumps(config, indent=2) + "\n")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory, checked to be ours."""
    file = Path(path) / CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path}: not a model directory ({CONFIG} missing; "
                            "make one with `python -m convert`)") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{file}: not JSON ({e})") from None
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ModelDirError(f"{file}: not a {FORMAT} version {VERSION} config")
    return config


def _load_tree(file: Path, expected: dict[str, Any] | None, dtype: Any) -> dict:
    """Reads a safetensors file of our dotted names into a tree, checked against ``expected``."""
    try:
        tensors = SafeTensors(file)
    except FileNotFoundError:
        raise ModelDirError(f"{file}: missing") from None
    except SafetensorsError as e:
        raise ModelDirError(str(e)) from None
    if expected is not None:
        problems = [f"missing {k}" for k in expected if k not in tensors]
        problems += [f"unexpected {k}" for k in tensors if k not in expected]
        problems += [f"{k} has shape {tensors.shape(k)}, expected {tuple(v.shape)}"
                     for k, v in expected.items() if k in tensors and tensors.shape(k) != v.shape]
        if problems:
            raise ModelDirError(f"{file}:\n  " + "\n  ".join(problems))
    return nest({k: jnp.asarray(np.asarray(tensors[k]), dtype or tensors[k].dtype)
                 for k in tensors})


def load(path: str | os.PathLike, dtype: Any = None, adapters: tuple[str, ...] | None = None
         ) -> Model:
    """Loads a model directory. ``dtype`` casts the frozen params (default: as stored);
    ``adapters`` picks which adapters to load (default: all present)."""
    path = Path(path)
    config = read_config(path)
    transformer_config = MMDiTConfig.from_diffusers(config["transformer"])
    vae_config = VAEConfig.from_diffusers(config["vae"])
    abstract = {"transformer": mmdit_abstract_params(transformer_config),
                "vae": vae_abstract_params(vae_config)}
    params = {net: _load_tree(path / network_file(net), flatten(tree), dtype)
              for net, tree in abstract.items()}
    names = tuple(config["adapters"]) if adapters is None else adapters
    loaded = {}
    for name in names:
        if name not in config["adapters"]:
            raise ModelDirError(f"{path}: has no {name!r} adapter "
                                f"(it has: {', '.join(config['adapters']) or 'none'})")
        loaded[name] = _load_tree(path / adapter_file(name), None, jnp.float32)
    embeddings = {}
    if (path / EMBEDDINGS).is_file():
        for key, value in SafeTensors(path / EMBEDDINGS).items():
            prompt, _, field = key.partition(".")
            embeddings.setdefault(prompt, {})[field] = jnp.asarray(value, jnp.float32)
    return Model(path, transformer_config, vae_config, params, loaded, embeddings)
