"""One-step TSD-SR inference: LR images in, ×upscale super-resolved images out.

    pipe = Pipeline(model_dir.load("models/tsdsr"), InferenceConfig())
    sr = pipe([lr_uint8_hwc, ...], batch_size=4)   # list of uint8 (H·4, W·4, 3) arrays

As the official ``test_tsdsr.py``, per image: bicubic upsampling with PyTorch's semantics,
padding to a multiple of 16, then the one-step student of :mod:`tsdsr_jax.diffusion.denoiser`
(its LoRA merged; Gaussian latent tiles when large), decode, crop back, and the colour fix
against the LR image (its wavelet source, and an output made larger than ×upscale, resized as
PIL does: :mod:`~tsdsr_jax.inference.pil_resize`). All of it is one jitted function per batch
size and size class (:mod:`~tsdsr_jax.inference.canvas`): images of many sizes share a compiled
program, each computed as if alone. uint8 in and uint8 out; given a device mesh, each batch is
split over its devices (the weights over ``fsdp``, as in training). An image's posterior noise
derives from the seed and the image's key alone, so its output does not depend on its batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax import sharding
from tsdsr_jax.checks import in_range, one_of
from tsdsr_jax.diffusion.denoiser import (
    PATCH_SIZE,
    STUDENT_TIMESTEP,
    Networks,
    decode,
    student,
)
from tsdsr_jax.inference import canvas, colorfix, tiling
from tsdsr_jax.inference.canvas import Geometry, SizeClass, noise_id
from tsdsr_jax.inference.pil_resize import resize_with_taps
from tsdsr_jax.inference.resize import apply_taps
from tsdsr_jax.io.images import to_uint8
from tsdsr_jax.io.model_dir import Model
from tsdsr_jax.models import PRECISIONS, lora, mmdit
from tsdsr_jax.models.extent import region_mask
from tsdsr_jax.models.mmdit import ATTENTION_IMPLS, MMDiT, MMDiTConfig
from tsdsr_jax.models.vae import AutoencoderKL

K = TypeVar("K")
MAX_UPSCALE = 16
# What a batch that fails on the device (out of memory, most likely) is told to try.
SMALLER = ("--latent-max-tiles 4, or --vae-encoder-tile 1024 --vae-decoder-tile 128 "
           "--vae-max-tiles 1, or a smaller --batch-size")
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
    # Size classes per octave of the working image's sides (0: a program per size). A tiled VAE
    # compiles per size.
    size_class_steps: int = 2

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
        in_range(self, "size_class_steps", 0, 16)

    @property
    def tiled_vae(self) -> bool:
        return bool(self.vae_encoder_tile or self.vae_decoder_tile)


def attention_impl(config: InferenceConfig) -> tuple[str | None, str | None]:
    """The attention kernel: as configured, else in half precision the backend's own (cuDNN's
    fused one on a GPU of compute capability 8.0 or newer, 4.5× faster than XLA's on an H200;
    splash on a TPU), else JAX's default; and the note line of a fallback
    (:func:`mmdit.attention_here`)."""
    if config.attention_impl or config.precision == "fp32":
        return mmdit.attention_here(config.attention_impl)
    return mmdit.attention_here(mmdit.resolve_attention("auto", jax.default_backend()))


def inference_params(params: dict[str, Any], adapters: dict[str, Any],
                     default_prompt: dict[str, Any], config: MMDiTConfig,
                     vae_dtype: Any = None) -> dict[str, Any]:
    """The network's inputs, in ``config.dtype`` (the VAE in ``vae_dtype``, when given): the
    student LoRA merged into the base (where the model has it), and the transformer's
    conditioning on the student's timestep and the default prompt, computed once here (the
    network holds no weights behind it)."""
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
    vae = jax.tree_util.tree_map(lambda a: jnp.asarray(a, vae_dtype or config.dtype), vae)
    return {"transformer": mmdit.without_conditioning(transformer), "vae": vae,
            "default": conditioning}


class Pipeline:
    """The student (LoRA merged into the frozen base) as one jitted function per batch size and
    size class. A model whose params are ``jax.ShapeDtypeStruct`` gives a pipeline that can only
    be compiled (tsdsr_jax.aot)."""

    def __init__(self, model: Model, config: InferenceConfig = InferenceConfig(),
                 mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.mesh = mesh
        dtype = PRECISIONS[config.precision]
        if "default" not in model.embeddings:
            raise ValueError(f"{model.path}: no default-prompt embeddings "
                             "(convert with --embeddings)")
        attention = attention_impl(config)[0]
        self.nets = Networks(
            MMDiT(dataclasses.replace(model.transformer_config, dtype=dtype,
                                      attention_impl=attention)),
            AutoencoderKL(dataclasses.replace(model.vae_config, attention_impl=attention,
                                              dtype=model.vae_config.compute_dtype(dtype))))
        prepare = functools.partial(inference_params, config=self.nets.mmdit.config,
                                    vae_dtype=self.nets.vae.config.dtype)
        args = (model.params, model.adapters, model.embeddings["default"])
        abstract = isinstance(jax.tree_util.tree_leaves(model.params)[0], jax.ShapeDtypeStruct)
        self.params = jax.eval_shape(prepare, *args) if abstract else prepare(*args)
        if mesh is not None and not abstract:
            self.params = sharding.put(self.params, self._params_sharding())
        self._build()

    def _params_sharding(self) -> Any:
        return sharding.shardings(self.params, self.mesh, True,
                                  sharding.ShardingConfig.min_shard_size)

    def _build(self) -> None:
        """The size classes and the jitted network of ``self.config``."""
        config = self.config
        self.classes = canvas.Classes(
            config.upscale, config.process_size, config.latent_tile, config.latent_overlap,
            self.nets.mmdit.config, 0 if config.tiled_vae else config.size_class_steps)
        if self.mesh is None:
            self.network = jax.jit(self._super_resolve, static_argnums=5)
        else:
            batch = sharding.batch_sharding(self.mesh)
            self.network = jax.jit(
                self._super_resolve, static_argnums=5,
                in_shardings=(self._params_sharding(), batch, batch,
                              sharding.replicated(self.mesh), batch),
                out_shardings=sharding.replicated(self.mesh))

    def with_options(self, **changes: Any) -> Pipeline:
        """A pipeline of other :class:`InferenceConfig` options (colour fix, upscale, tiling,
        ...) that shares this one's networks and weights (one copy on the device). The options
        that shape the weights (precision, attention) cannot change."""
        fixed = [name for name in ("precision", "attention_impl") if name in changes]
        if fixed:
            raise ValueError(f"{fixed[0]}: shapes the weights; make another Pipeline")
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **changes)
        other._build()
        return other

    # ------------------------------------------------------------------ the jitted network

    def _super_resolve(self, params: dict[str, Any], lr: jax.Array, ids: jax.Array,
                       rng: jax.Array, geometry: Geometry, cls: SizeClass
                       ) -> tuple[jax.Array, jax.Array]:
        """(B, h, w, 3) uint8 LR canvases -> (B, H, W, 3) uint8 SR canvases of class ``cls``
        and (B,) whether each image's result was finite; each image at the top left, of its
        own sizes in ``geometry``; ``ids`` (B,) uint32 key each image's posterior noise (with
        ``rng``)."""
        cfg, nets, g = self.config, self.nets, geometry
        image = lr.astype(jnp.float32) / 255
        x = apply_taps(apply_taps(image, *g.cols, axis=-2), *g.rows, axis=-3)
        x = jnp.clip(x * 2 - 1, -1, 1)
        vae = {"params": params["vae"]}
        f = nets.vae.config.downscale_factor
        if cfg.tiled_vae:  # compiled per size: the canvas is the working image
            extent = latent_extent = None
        else:
            extent, latent_extent = g.work, g.work // f
        encoder = functools.partial(nets.vae.apply, vae, extent=extent, method="encode")
        decoder = functools.partial(nets.vae.apply, vae, extent=latent_extent, method="decode")
        if cfg.vae_encoder_tile:
            encoder = functools.partial(tiling.tiled_encode, nets.vae, vae,
                                        tile=cfg.vae_encoder_tile, max_tiles=cfg.vae_max_tiles)
        if cfg.vae_decoder_tile:
            decoder = functools.partial(tiling.tiled_decode, nets.vae, vae,
                                        tile=cfg.vae_decoder_tile, max_tiles=cfg.vae_max_tiles)
        noise = None
        if cfg.vae_posterior == "sample":
            latent = (x.shape[1] // f, x.shape[2] // f, nets.vae.config.latent_channels)
            keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, ids)
            noise = jax.vmap(functools.partial(posterior_noise, shape=latent))(keys)
        tiles = None
        if cls.tile is not None:
            tiles = functools.partial(tiling.tiled_apply_at, corners=g.tiles,
                                      present=g.tile_weight, tile=cls.tile,
                                      max_tiles=cfg.latent_max_tiles)
        _, z_h = student(nets, params, None, x, params["default"], noise, encoder=encoder,
                         tiles=tiles, layout=g.layout)
        decoded = decode(nets, vae, z_h, decoder)
        # checked here too: the way back through uint8 below would hide a NaN
        finite = jnp.all(jnp.isfinite(decoded) | ~region_mask(g.work, *decoded.shape[1:3]),
                         axis=(1, 2, 3))
        sr = jnp.clip(decoded, -1, 1) * 0.5 + 0.5
        # made larger than ×upscale: the official path back, PIL's resize of the uint8 image
        back = resize_with_taps(to_uint8(sr), *g.back, rows_first=cls.back[0])
        sr = jnp.where(g.resized[:, None, None, None], back.astype(jnp.float32) / 255,
                       _fit(sr, cls.out))
        source = image
        if cfg.color_fix == "wavelet":  # the LR upscaled by PIL to the output's size
            source = resize_with_taps(lr, *g.source, rows_first=False).astype(jnp.float32) / 255
        fixed = colorfix.COLOR_FIXES[cfg.color_fix](sr, source, g.final, g.lr)
        inside = region_mask(g.final, *fixed.shape[1:3])
        finite &= jnp.all(jnp.isfinite(fixed) | ~inside, axis=(1, 2, 3))
        return to_uint8(fixed), finite

    # ------------------------------------------------------------------ images in, images out

    def size_class(self, height: int, width: int) -> SizeClass:
        """The size class of an LR image of ``height`` x ``width``."""
        return self.classes.of((height, width))

    def inputs(self, images: Sequence[np.ndarray], ids: Sequence[int], rng: jax.Array,
               cls: SizeClass | None = None) -> tuple:
        """The network's arguments for uint8 LR images (h, w, 3) of one class (``cls``: the
        first image's), or for their shapes (``jax.ShapeDtypeStruct``, to compile)."""
        sizes = [tuple(im.shape[:2]) for im in images]
        cls = cls or self.size_class(*sizes[0])
        shape = (len(images), *cls.lr, 3)
        if isinstance(images[0], jax.ShapeDtypeStruct):
            lr = jax.ShapeDtypeStruct(shape, jnp.uint8)
        else:
            lr = np.zeros(shape, np.uint8)
            for b, im in enumerate(images):
                lr[b, :im.shape[0], :im.shape[1]] = im
        return (self.params, lr, np.asarray(ids, np.uint32), rng,
                self.classes.geometry(cls, sizes), cls)

    def dispatch(self, images: Sequence[np.ndarray], ids: Sequence[int], rng: jax.Array,
                 cls: SizeClass | None = None) -> tuple[jax.Array, jax.Array]:
        """Starts a batch of uint8 LR images (h, w, 3) of one size class (``cls``, if known) on
        the device and returns their SR canvases (B, H, W, 3) uint8 and whether each is finite
        (B,), without waiting (image b's SR is its top-left ``upscale·h x upscale·w``); with a
        mesh, B must be a multiple of its size."""
        if self.mesh is not None and len(images) % self.mesh.size:
            raise ValueError(f"a batch of {len(images)} does not split over "
                             f"{self.mesh.size} devices")
        with sharding.activate(self.mesh) if self.mesh else contextlib.nullcontext():
            return self.network(*self.inputs(images, ids, rng, cls))

    def batches(self, images: Iterable[tuple[K, np.ndarray]], batch_size: int = 1,
                seed: int = 42, window: int | None = None,
                on_compile: Callable[[SizeClass], None] | None = None
                ) -> Iterator[list[Result[K]]]:
        """Super-resolves keyed uint8 RGB images of any sizes as they come, ``batch_size`` of
        one size class at a time (a short batch is padded by repeating its last image, so that
        each class compiles once); yields each batch's :class:`Result` once done. At most
        ``window`` images (default 4 batches) wait for their class's batch to fill; then the
        fullest class goes short. The next batch is already on the device while the caller
        handles one. An image's noise derives from ``seed`` and ``noise_id(key)``.
        ``on_compile`` hears of each class before its first batch (which compiles)."""
        window = window or 4 * batch_size
        rng = jax.random.key(seed)
        waiting: dict[SizeClass, list[tuple[K, np.ndarray]]] = {}
        seen: set[SizeClass] = set()
        running = None

        def start(cls: SizeClass) -> tuple[list[tuple[K, np.ndarray]], Any]:
            chunk = waiting.pop(cls)
            if cls not in seen and on_compile is not None:
                on_compile(cls)
            seen.add(cls)
            lr = [im for _, im in chunk]
            lr += lr[-1:] * (batch_size - len(lr))
            ids = [noise_id(key) for key, _ in chunk]
            ids += ids[-1:] * (batch_size - len(ids))
            try:
                return chunk, self.dispatch(lr, ids, rng, cls)
            except jax.errors.JaxRuntimeError as e:
                return chunk, e

        def fullest() -> SizeClass:
            return max(waiting, key=lambda c: len(waiting[c]))

        for key, image in images:
            cls = self.size_class(*image.shape[:2])
            waiting.setdefault(cls, []).append((key, image))
            if len(waiting[cls]) < batch_size and sum(map(len, waiting.values())) < window:
                continue
            started = start(cls if len(waiting[cls]) == batch_size else fullest())
            if running is not None:
                yield _done(*running, self.config.upscale)
            running = started
        while waiting:
            started = start(fullest())
            if running is not None:
                yield _done(*running, self.config.upscale)
            running = started
        if running is not None:
            yield _done(*running, self.config.upscale)

    def __call__(self, images: Sequence[np.ndarray], batch_size: int = 1, seed: int = 42
                 ) -> list[np.ndarray]:
        """Super-resolves uint8 RGB images of any sizes, in their order (see :meth:`batches`;
        image i's key is i); a :class:`Result`'s problem is a RuntimeError."""
        done = {}
        for batch in self.batches(enumerate(images), batch_size, seed):
            for result in batch:
                if result.problem:
                    raise RuntimeError(f"image {result.key}: {result.problem}")
                done[result.key] = result.sr
        return [done[i] for i in range(len(images))]


class Result(NamedTuple, Generic[K]):
    """One image's outcome: its SR, or None and the ``problem`` (non-finite values, or a batch
    that failed on the device)."""

    key: K
    lr: np.ndarray
    sr: np.ndarray | None
    problem: str | None = None


def posterior_noise(key: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """N(0, 1) noise (h, w, C) whose values at a pixel do not depend on ``h`` or ``w``: row r is
    drawn from ``fold_in(key, r)`` as one flat vector (threefry's draws of a flat vector extend,
    they do not reshuffle, as it grows)."""
    h, w, c = shape
    row = lambda r: jax.random.normal(jax.random.fold_in(key, r), (w * c,))  # noqa: E731
    return jax.vmap(row)(jnp.arange(h)).reshape(h, w, c)


def _fit(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``x`` (B, H, W, C) cut or zero-padded at the bottom and right to ``size``."""
    x = x[:, :size[0], :size[1]]
    return jnp.pad(x, ((0, 0), (0, size[0] - x.shape[1]), (0, size[1] - x.shape[2]), (0, 0)))


def _done(chunk: list[tuple[K, np.ndarray]], started: Any, upscale: int) -> list[Result[K]]:
    """A dispatched batch's results, waited for (its padding dropped)."""
    try:
        if isinstance(started, Exception):
            raise started
        sr, finite = (np.asarray(a) for a in started)
    except jax.errors.JaxRuntimeError as e:
        what = "out of memory" if "RESOURCE_EXHAUSTED" in str(e) else str(e).split("\n")[0]
        return [Result(key, im, None, f"failed on the device ({what}); try {SMALLER}")
                for key, im in chunk]
    return [Result(key, im, sr[b, :upscale * im.shape[0], :upscale * im.shape[1]], None)
            if finite[b] else
            Result(key, im, None, f"non-finite values in the output; try --precision fp32 "
                                  f"or {SMALLER}")
            for b, (key, im) in enumerate(chunk)]
