"""Precomputes what training reads besides the images, as the official ``data/process.py`` does.

::

    tsdsr-prepare --model MODEL_DIR --data ROOT [ROOT ...] \
        [--text-encoders SD3_DIR] [--posterior sample|mean]

- ``latent_hr/<stem>.safetensors``: ``E(x_H)·scaling_factor`` (no shift factor, as the official
  code) of every ``gt/`` image with our JAX VAE, (h/8, w/8, 16) float32. The official code stores
  a posterior *sample*; ``--posterior mean`` stores the mean instead.
- with ``--text-encoders``: ``prompt_embeds/<stem>.safetensors`` (333, 4096) and
  ``pool_embeds/<stem>.safetensors`` (2048,) of every ``prompt_txt/<stem>.txt``, and the null
  ("") and default prompts' embeddings added to ``MODEL_DIR/embeddings.safetensors`` when absent.

Resumable: samples that already have their files (ours or the official ``.pt``) are skipped;
every file appears atomically.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tsdsr_jax import cli
from tsdsr_jax.data import layout
from tsdsr_jax.data.source import to_unit
from tsdsr_jax.data.text import DEFAULT_PROMPT, encode_prompts, load_text_encoders
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.images import ImageError, load_image
from tsdsr_jax.io.safetensors import SafeTensors, save_arrays
from tsdsr_jax.models import vae as vae_lib

PROMPTS = {"null": "", "default": DEFAULT_PROMPT}


def _todo(root: Path, source: str, extensions: tuple[str, ...], targets: Sequence[str]
          ) -> list[tuple[str, Path]]:
    """``(stem, source file)`` of the files in ``root/source`` lacking a file in any target."""
    done = [layout.stems(root / t, layout.TENSOR_EXTENSIONS) for t in targets]
    files = layout.stems(root / source, extensions)
    for t in targets:
        (root / t).mkdir(exist_ok=True)
    return [(stem, root / source / files[stem]) for stem in sorted(files, key=layout.sort_key)
            if any(stem not in d for d in done)]


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@functools.cache
def latent_encoder(config: vae_lib.VAEConfig, posterior: str) -> Callable:
    """Jitted ``(params, images (B,H,W,3) in [-1,1], keys (B,)) -> E(x)·scaling_factor``, the
    posterior's mean or a sample drawn with each image's own key."""
    vae = vae_lib.AutoencoderKL(config)

    @jax.jit
    def encode(params: Any, x: jax.Array, keys: jax.Array) -> jax.Array:
        mean, logvar = vae.apply({"params": params}, x, method="encode")
        if posterior == "sample":
            noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
            mean = mean + jnp.exp(0.5 * logvar) * noise
        return mean.astype(jnp.float32) * config.scaling_factor

    return encode


def write_latents(model: model_dir.Model, roots: Sequence[Path], posterior: str, seed: int,
                  batch_size: int) -> None:
    """Encodes every ``gt/`` image lacking a latent (same-sized images batched together)."""
    encode = latent_encoder(model.vae_config, posterior)

    todo = [(root, stem, path) for root in roots
            for stem, path in _todo(root, layout.GT, layout.IMAGE_EXTENSIONS, [layout.LATENT_HR])]
    key = jax.random.key(seed)
    with tqdm(total=len(todo), desc="HR latents", unit="img") as bar:
        for chunk in _chunks(todo, batch_size):
            images = [to_unit(load_image(path)) for _, _, path in chunk]
            groups: dict[tuple, list[int]] = {}
            for i, image in enumerate(images):
                groups.setdefault(image.shape, []).append(i)
            for members in groups.values():
                keys = jnp.stack([jax.random.fold_in(key, _seed_of(chunk[i][0], chunk[i][1]))
                                  for i in members])
                latents = np.asarray(encode(model.params["vae"],
                                            jnp.stack([images[i] for i in members]), keys))
                for i, latent in zip(members, latents):
                    root, stem, _ = chunk[i]
                    save_arrays(root / layout.LATENT_HR / f"{stem}.safetensors",
                                {"latent_hr": latent})
            bar.update(len(chunk))


def _seed_of(root: Path, stem: str) -> int:
    """A per-image noise seed that does not depend on which images were already done."""
    return zlib.crc32(f"{root.name}/{stem}".encode()) & 0x7FFFFFFF


def write_prompt_embeddings(text, roots: Sequence[Path], batch_size: int, dtype: np.dtype
                            ) -> None:
    """Encodes every caption lacking its prompt or pooled embeddings."""
    todo = [(root, stem, path) for root in roots
            for stem, path in _todo(root, layout.PROMPT_TXT, (".txt",),
                                    [layout.PROMPT_EMBEDS, layout.POOL_EMBEDS])]
    with tqdm(total=len(todo), desc="captions", unit="txt") as bar:
        for chunk in _chunks(todo, batch_size):
            prompts = [path.read_text(encoding="utf-8").strip() for _, _, path in chunk]
            embeds, pooled = encode_prompts(text, prompts)
            for (root, stem, _), e, p in zip(chunk, embeds, pooled):
                save_arrays(root / layout.PROMPT_EMBEDS / f"{stem}.safetensors",
                            {"prompt_embeds": e.astype(dtype)})
                save_arrays(root / layout.POOL_EMBEDS / f"{stem}.safetensors",
                            {"pooled_prompt_embeds": p.astype(dtype)})
            bar.update(len(chunk))


def write_fixed_prompts(text, model_path: Path) -> None:
    """Adds the null and default prompts' embeddings to the model directory, when absent."""
    file = model_path / model_dir.EMBEDDINGS
    arrays = {k: np.array(v) for k, v in SafeTensors(file).items()} if file.is_file() else {}
    missing = [name for name in PROMPTS if f"{name}.prompt_embeds" not in arrays]
    if not missing:
        return
    embeds, pooled = encode_prompts(text, [PROMPTS[name] for name in missing])
    for name, e, p in zip(missing, embeds, pooled):
        arrays[f"{name}.prompt_embeds"] = e
        arrays[f"{name}.pooled_prompt_embeds"] = p
    save_arrays(file, arrays)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="tsdsr-prepare",
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (tsdsr-convert)")
    parser.add_argument("--data", required=True, nargs="+", help="dataset roots (gt/, prompt_txt/)")
    parser.add_argument("--text-encoders", help="SD3 diffusers folder: also encode the captions")
    parser.add_argument("--posterior", choices=("sample", "mean"), default="sample")
    parser.add_argument("--seed", type=cli.seed, default=0, help="posterior sampling seed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--embeddings-dtype", choices=("float32", "bfloat16", "float16"),
                        default="float32", help="storage type of the caption embeddings")
    parser.add_argument("--device", default=None, help="torch device of the text encoders")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be at least 1")
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if args.text_encoders and missing:
        parser.error(f"--text-encoders needs {' and '.join(missing)}: pip install -e '.[text]'")
    roots = [Path(r) for r in args.data]
    for root in roots:
        if not (root / layout.GT).is_dir():
            parser.error(f"{root}: has no {layout.GT}/ folder")
    try:
        model = model_dir.load(args.model, adapters=())
        write_latents(model, roots, args.posterior, args.seed, args.batch_size)
    except (model_dir.ModelDirError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.text_encoders:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        text = load_text_encoders(args.text_encoders, device)
        write_prompt_embeddings(text, roots, args.batch_size, np.dtype(args.embeddings_dtype))
        write_fixed_prompts(text, Path(args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
