"""One-step TSD-SR inference: LR images in, ×upscale super-resolved images out.

    pipe = Pipeline(model_dir.load("models/tsdsr"), InferenceConfig())
    sr = pipe([lr_uint8_hwc, ...], batch_size=4)   # list of uint8 (H·4, W·4, 3) arrays

As the official ``test_tsdsr.py``, per image: bicubic upsampling with PyTorch's semantics,
padding to a multiple of 16, then the one-step student of :mod:`tsdsr_jax.diffusion.denoiser`
(its LoRA merged; Gaussian latent tiles when large), decode, crop back, and the colour fix
against the LR image (its wavelet source, and an output made larger than ×upscale, resized as
PIL does: :mod:`~tsdsr_jax.inference.pil_resize`). All of it is one jitted function per
(batch, size), uint8 in and uint8 out; given a device mesh, each batch is split over its devices
(the weights over ``fsdp``, as in training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax import sharding
from tsdsr_jax.checks import in_range, one_of
from tsdsr_jax.diffusion.denoiser import (
    MULTIPLE,
    PATCH_SIZE,
    STUDENT_TIMESTEP,
    Networks,
    decode,
    student,
)
from tsdsr_jax.inference import colorfix, tiling
from tsdsr_jax.inference.pil_resize import pil_resize
from tsdsr_jax.inference.resize import resize_bicubic
from tsdsr_jax.io.images import to_uint8
from tsdsr_jax.io.model_dir import Model
from tsdsr_jax.models import PRECISIONS, lora, mmdit
from tsdsr_jax.models.mmdit import ATTENTION_IMPLS, MMDiT, MMDiTConfig
from tsdsr_jax.models.vae import AutoencoderKL

K = TypeVar("K")
MAX_UPSCALE = 16
# The smallest tiles: below them the halos dwarf the tiles (and the windows' count explodes).
MIN_LATENT_TILE, MIN_VAE_ENCODER_TILE, MIN_VAE_DECODER_TILE = 8, 128, 16


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """What the official ``test_tsdsr.py`` exposes, plus our options."""

    upscale: int = 4
    process_size: int = 512
    color_fix: str = "wavelet"          # wavelet | adain | none
    vae_posterior: str = "sample"       # sample (official) | mean (deterministic)
    precision: str = "bf16"             # bf16 | fp16 | fp32
    latent_tile: int = 64               # latent pixels; tiles only when h·w > tile²
    latent_overlap: int = 8
    vae_encoder_tile: int | None = None  # image pixels; None = untiled
    vae_decoder_tile: int | None = None  # latent pixels; None = untiled
    # How many tiles go through the network at once (None: all). Fewer tiles hold less memory;
    # VAE windows in chunks normalise with GroupNorm statistics estimated from a downscaled copy
    # of the image (vaehook's fast mode), which is approximate.
    latent_max_tiles: int | None = None
    vae_max_tiles: int | None = None
    attention_impl: str | None = None   # None: cuDNN on a GPU in bf16/fp16, else XLA

    def __post_init__(self):
        in_range(self, "upscale", 1, MAX_UPSCALE)
        in_range(self, "process_size", low=1)
        one_of(self, "color_fix", colorfix.COLOR_FIXES)
        one_of(self, "vae_posterior", ("sample", "mean"))
        one_of(self, "precision", PRECISIONS)
        in_range(self, "latent_tile", low=MIN_LATENT_TILE)
        if self.latent_tile % PATCH_SIZE:
            raise ValueError(f"latent_tile={self.latent_tile}: must be a multiple of the "
                             f"transformer's patch size {PATCH_SIZE}")
        in_range(self, "latent_overlap", low=0, below=self.latent_tile)
        in_range(self, "vae_encoder_tile", low=MIN_VAE_ENCODER_TILE)
        in_range(self, "vae_decoder_tile", low=MIN_VAE_DECODER_TILE)
        in_range(self, "latent_max_tiles", low=1)
        in_range(self, "vae_max_tiles", low=1)
        one_of(self, "attention_impl", ATTENTION_IMPLS)


def target_size(height: int, width: int, config: InferenceConfig) -> tuple[int, int]:
    """The size the network makes for an LR image: ×upscale, unless a side is below
    process_size/upscale. Then, as the official rule, the image is first scaled so that its
    short side reaches it (and the result is resized back to ×upscale afterwards)."""
    low = config.process_size // config.upscale
    if width < low or height < low:
        scale = low / min(width, height)
        height, width = int(scale * height), int(scale * width)
    return config.upscale * height, config.upscale * width


def attention_impl(config: InferenceConfig) -> str | None:
    """The attention kernel: as configured, else cuDNN's fused one where it applies (a GPU,
    half precision: 4.5× faster than XLA's on an H200), else JAX's default."""
    if config.attention_impl or jax.default_backend() != "gpu" or config.precision == "fp32":
        return config.attention_impl
    return "cudnn"


def inference_params(params: dict[str, Any], adapters: dict[str, Any],
                     default_prompt: dict[str, Any], config: MMDiTConfig) -> dict[str, Any]:
    """The network's inputs, in ``config.dtype``: the student LoRA merged into the base (where
    the model has it), and the transformer's conditioning on the student's timestep and the
    default prompt, computed once here (the network holds no weights behind it)."""
    transformer, vae = params["transformer"], params["vae"]
    if "student" in adapters:
        transformer = lora.merge(transformer, adapters["student"])
    if "student_vae" in adapters:
        vae = lora.merge(vae, adapters["student_vae"])
    cast = functools.partial(jax.tree_util.tree_map, lambda a: jnp.asarray(a, config.dtype))
    transformer = cast(transformer)
    prompt = cast(default_prompt)
    conditioning = mmdit.condition(config, transformer, jnp.full((1,), STUDENT_TIMESTEP),
                                   prompt["prompt_embeds"][None],
                                   prompt["pooled_prompt_embeds"][None])
    return {"transformer": mmdit.without_conditioning(transformer), "vae": cast(vae),
            "default": conditioning}


class Pipeline:
    """The student (LoRA merged into the frozen base) as one jitted function per shape. A model
    whose params are ``jax.ShapeDtypeStruct`` gives a pipeline that can only be compiled
    (tsdsr_jax.aot)."""

    def __init__(self, model: Model, config: InferenceConfig = InferenceConfig(),
                 mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.mesh = mesh
        dtype = PRECISIONS[config.precision]
        if "default" not in model.embeddings:
            raise ValueError(f"{model.path}: no default-prompt embeddings "
                             "(convert with --embeddings)")
        self.nets = Networks(
            MMDiT(dataclasses.replace(model.transformer_config, dtype=dtype,
                                      attention_impl=attention_impl(config))),
            AutoencoderKL(dataclasses.replace(model.vae_config, dtype=dtype)))
        prepare = functools.partial(inference_params, config=self.nets.mmdit.config)
        args = (model.params, model.adapters, model.embeddings["default"])
        abstract = isinstance(jax.tree_util.tree_leaves(model.params)[0], jax.ShapeDtypeStruct)
        self.params = jax.eval_shape(prepare, *args) if abstract else prepare(*args)
        if mesh is None:
            self.network = jax.jit(self._super_resolve, static_argnums=3)
        else:
            params_sh = sharding.shardings(self.params, mesh, True,
                                          sharding.ShardingConfig.min_shard_size)
            if not abstract:
                self.params = sharding.put(self.params, params_sh)
            self.network = jax.jit(
                self._super_resolve, static_argnums=3,
                in_shardings=(params_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                out_shardings=sharding.replicated(mesh))

    # ------------------------------------------------------------------ the jitted network

    def _super_resolve(self, params: dict[str, Any], lr: jax.Array, rng: jax.Array,
                       size: tuple[int, int]) -> jax.Array:
        """(B, h, w, 3) uint8 LR -> (B, h·upscale, w·upscale, 3) uint8 SR, made at ``size``
        (:func:`target_size`) and colour-fixed against the LR."""
        cfg, nets = self.config, self.nets
        image = lr.astype(jnp.float32) / 255
        x = jnp.clip(resize_bicubic(image, size) * 2 - 1, -1, 1)
        pad_h, pad_w = (-size[0]) % MULTIPLE, (-size[1]) % MULTIPLE
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
        vae = {"params": params["vae"]}
        encoder = decoder = noise = None
        if cfg.vae_encoder_tile:
            encoder = functools.partial(tiling.tiled_encode, nets.vae, vae,
                                        tile=cfg.vae_encoder_tile, max_tiles=cfg.vae_max_tiles)
        if cfg.vae_decoder_tile:
            decoder = functools.partial(tiling.tiled_decode, nets.vae, vae,
                                        tile=cfg.vae_decoder_tile, max_tiles=cfg.vae_max_tiles)
        if cfg.vae_posterior == "sample":
            f = nets.vae.config.downscale_factor
            noise = jax.random.normal(rng, (x.shape[0], x.shape[1] // f, x.shape[2] // f,
                                            nets.vae.config.latent_channels))
        tiles = functools.partial(tiling.tiled_apply, tile=cfg.latent_tile,
                                  overlap=cfg.latent_overlap, max_tiles=cfg.latent_max_tiles)
        _, z_h = student(nets, params, None, x, params["default"], noise, encoder=encoder,
                         tiles=tiles)
        sr = jnp.clip(decode(nets, vae, z_h, decoder), -1, 1)[:, :size[0], :size[1]] * 0.5 + 0.5
        final = (cfg.upscale * lr.shape[1], cfg.upscale * lr.shape[2])
        if size != final:  # the official path: back to ×upscale with PIL's default resize
            sr = pil_resize(to_uint8(sr), final).astype(jnp.float32) / 255
        source = image
        if cfg.color_fix == "wavelet":  # the LR upscaled by PIL to the output's size
            source = pil_resize(lr, final).astype(jnp.float32) / 255
        return to_uint8(colorfix.COLOR_FIXES[cfg.color_fix](sr, source))

    # ------------------------------------------------------------------ images in, images out

    def dispatch(self, lr: np.ndarray, rng: jax.Array) -> jax.Array:
        """Starts a batch of same-sized LR images (B, h, w, 3) uint8 on the device and returns
        its SR (B, H, W, 3) uint8 without waiting for it; with a mesh, B must be a multiple of
        its size."""
        if self.mesh is not None and lr.shape[0] % self.mesh.size:
            raise ValueError(f"a batch of {lr.shape[0]} does not split over "
                             f"{self.mesh.size} devices")
        size = target_size(*lr.shape[1:3], self.config)
        with sharding.activate(self.mesh) if self.mesh else contextlib.nullcontext():
            return self.network(self.params, np.asarray(lr, np.uint8), rng, size)

    def super_resolve(self, lr: np.ndarray, rng: jax.Array) -> np.ndarray:
        """:meth:`dispatch`, waited for: the SR batch as a numpy array."""
        return np.asarray(self.dispatch(lr, rng))

    def batches(self, images: Iterable[tuple[K, np.ndarray]], batch_size: int = 1,
                seed: int = 42) -> Iterator[list[tuple[K, np.ndarray, np.ndarray]]]:
        """Super-resolves keyed uint8 RGB images of any sizes, same-sized ones ``batch_size`` at
        a time (a short batch is padded by repeating its last image, so that each size compiles
        once); yields each batch's ``(key, LR, SR)`` once done. The next batch is already on
        the device while the caller handles one."""
        by_size: dict[tuple[int, ...], list[tuple[K, np.ndarray]]] = defaultdict(list)
        for key, image in images:
            by_size[image.shape].append((key, image))
        rng = jax.random.key(seed)
        running = None
        for group in by_size.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                lr = [im for _, im in chunk]
                lr += lr[-1:] * (batch_size - len(lr))
                rng, sub = jax.random.split(rng)
                started = (chunk, self.dispatch(np.stack(lr), sub))
                if running is not None:
                    yield _done(*running)
                running = started
        if running is not None:
            yield _done(*running)

    def __call__(self, images: Sequence[np.ndarray], batch_size: int = 1, seed: int = 42
                 ) -> list[np.ndarray]:
        """Super-resolves uint8 RGB images of any sizes, in their order (see :meth:`batches`)."""
        done = {i: sr for batch in self.batches(enumerate(images), batch_size, seed)
                for i, _, sr in batch}
        return [done[i] for i in range(len(images))]


def _done(chunk: list[tuple[K, np.ndarray]], sr: jax.Array
          ) -> list[tuple[K, np.ndarray, np.ndarray]]:
    """A dispatched batch's ``(key, LR, SR)``, waited for (its padding dropped)."""
    return [(key, im, out) for (key, im), out in zip(chunk, np.asarray(sr))]
