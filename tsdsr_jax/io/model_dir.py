"""The model directory that ``tsdsr-convert`` writes and everything else loads.

::

    MODEL_DIR/
      config.json                  format, transformer and VAE configs, adapters, latent scaling
      transformer.safetensors      frozen SD3 MMDiT (our tree's dotted names and layouts)
      vae.safetensors              frozen SD3 VAE
      adapter_<name>.safetensors   LoRA adapters in float32: student (transformer), student_vae,
                                   teacher, fake_score, as present
      embeddings.safetensors       <prompt>.prompt_embeds (L, 4096), <prompt>.pooled_prompt_embeds
                                   (2048,) for the prompts present: default, null
      lpips.safetensors            LPIPS backbone and heads in float32, if converted
                                   (config.json's "lpips": {"net": "alex"|"vgg", "source": ...})
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

from tsdsr_jax.io.safetensors import SafeTensors, SafetensorsError
from tsdsr_jax.io.tree import flatten, nest, shape_problems
from tsdsr_jax.models import lpips, mmdit, vae
from tsdsr_jax.models.mmdit import MMDiTConfig
from tsdsr_jax.models.vae import VAEConfig

FORMAT = "tsdsr-jax-model"
VERSION = 1
CONFIG = "config.json"
EMBEDDINGS = "embeddings.safetensors"
LPIPS = "lpips.safetensors"


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


def write_config(path: Path, transformer_config: MMDiTConfig, vae_config: VAEConfig,
                 adapters: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """Writes ``config.json``; ``adapters`` maps each adapter name to ``{'rank': r, ...}``."""
    config = {"format": FORMAT, "version": VERSION, "transformer": transformer_config.to_dict(),
              "vae": vae_config.to_dict(), "adapters": adapters, **(extra or {})}
    path.write_text(json.dumps(config, indent=2) + "\n")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory, checked to be ours."""
    file = Path(path) / CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{path}: not a model directory ({CONFIG} missing; "
                            "make one with `tsdsr-convert`)") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{file}: not JSON ({e})") from None
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ModelDirError(f"{file}: not a {FORMAT} version {VERSION} config")
    return config


def _load_tree(file: Path, expected: dict[str, Any] | None, dtype: Any, host: bool = False
               ) -> dict:
    """Reads a safetensors file of our dotted names into a tree, checked against ``expected``:
    device arrays (on the default device), or numpy arrays with ``host``."""
    try:
        tensors = SafeTensors(file)
    except FileNotFoundError:
        raise ModelDirError(f"{file}: missing") from None
    except SafetensorsError as e:
        raise ModelDirError(str(e)) from None
    if expected is not None:
        problems = shape_problems({k: tensors.shape(k) for k in tensors},
                                  {k: v.shape for k, v in expected.items()})
        if problems:
            raise ModelDirError(f"{file}:\n  " + "\n  ".join(problems))
    xp = np if host else jnp
    return nest({k: xp.asarray(np.asarray(tensors[k]), dtype or tensors[k].dtype)
                 for k in tensors})


def load(path: str | os.PathLike, dtype: Any = None, adapters: tuple[str, ...] | None = None,
         host: bool = False) -> Model:
    """Loads a model directory. ``dtype`` casts the frozen params (default: as stored);
    ``adapters`` picks which adapters to load (default: all present); ``host`` keeps the
    frozen params in host memory (numpy), for a caller that puts each straight onto its
    sharding, so that no device ever holds them all."""
    path = Path(path)
    config = read_config(path)
    transformer_config = MMDiTConfig.from_diffusers(config["transformer"])
    vae_config = VAEConfig.from_diffusers(config["vae"])
    abstract = {"transformer": mmdit.abstract_params(transformer_config),
                "vae": vae.abstract_params(vae_config)}
    params = {net: _load_tree(path / network_file(net), flatten(tree), dtype, host)
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


def load_lpips(path: str | os.PathLike, dtype: Any = None) -> tuple[str, dict[str, Any]]:
    """The LPIPS weights of a model directory: ``(net, params)`` for ``models.lpips.lpips``."""
    path = Path(path)
    entry = read_config(path).get("lpips")
    if not entry or entry.get("net") not in lpips.NETS:
        raise ModelDirError(f"{path}: has no LPIPS weights (convert with "
                            "`tsdsr-convert ... --lpips-backbone alexnet-*.pth`)")
    net = entry["net"]
    return net, _load_tree(path / LPIPS, flatten(lpips.abstract_params(net)), dtype)


# A tiny random model with the SD3 structure (VAE factor 8, 16-channel latents), for demos and
# tests on machines without the SD3 weights. Its outputs are not super-resolved images.
TINY_TRANSFORMER = MMDiTConfig(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                               attention_head_dim=16, num_attention_heads=2,
                               joint_attention_dim=32, caption_projection_dim=32,
                               pooled_projection_dim=32, out_channels=16, pos_embed_max_size=96)
TINY_VAE = VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=16,
                     norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0,
                     use_quant_conv=False, use_post_quant_conv=False)


def tiny(seed: int = 0, prompt_len: int = 8) -> Model:
    """The built-in tiny random model (``--model tiny``)."""
    k_t, k_v, k_p, k_q = jax.random.split(jax.random.key(seed), 4)
    params = {"transformer": mmdit.init_params(k_t, TINY_TRANSFORMER),
              "vae": vae.init_params(k_v, TINY_VAE)}
    embeddings = {"default": {
        "prompt_embeds": jax.random.normal(k_p, (prompt_len, TINY_TRANSFORMER.joint_attention_dim)),
        "pooled_prompt_embeds": jax.random.normal(k_q, (TINY_TRANSFORMER.pooled_projection_dim,))}}
    return Model(Path("tiny"), TINY_TRANSFORMER, TINY_VAE, params, {}, embeddings)
