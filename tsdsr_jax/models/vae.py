"""The SD3 VAE: diffusers' ``AutoencoderKL`` in Flax linen, NHWC.

Module names are diffusers' (``encoder.down_blocks.0.resnets.1.conv1``, see
:mod:`tsdsr_jax.io.tree`), so a diffusers state dict converts leaf by leaf. Every Conv/Dense takes
a LoRA update from the ``lora`` collection. ``encode``/``decode`` apply no scaling or shift (see
:mod:`tsdsr_jax.diffusion.denoiser`)::

    vae = AutoencoderKL(config)
    mean, logvar = vae.apply({'params': params}, image, method='encode')
    image = vae.apply({'params': params}, latent, method='decode')

Both take an optional ``extent`` (B, 2) int32: each image's true (height, width) in pixels of the
input, which lies at the top left of a larger padded array (a size class of
:mod:`tsdsr_jax.inference.canvas`). The network then computes on the true region exactly what it
computes on the image alone: every spatial convolution sees zeros beyond it, GroupNorm takes its
statistics over it, and the mid-block attention attends to it only. The padding's outputs are
undefined.

The mid-block attention is one head over all H·W latent positions (4096 at 512²). By default it
runs in XLA in query chunks (:func:`single_head_attention`); with ``attention_impl="splash"``
(what a TPU resolves "auto" to, as for the MMDiT) it runs in the Pallas splash kernel, which
keeps the (T, T) scores on chip: XLA's own fusion of their backward pass at two 512² images
per chip asks for more than a v6e's 128 MiB of on-chip VMEM.

With ``remat_norms`` (training sets it) each GroupNorm and the SiLU after it are recomputed in
the backward pass from their bfloat16 input instead of stored. XLA's TPU compiler otherwise keeps
float32 copies of them: the decoder's input gradient at two 512² images per v6e chip needs
15.9 GiB of temporaries, and 3.0 GiB with them recomputed (2.4 and 2.3 on an H200).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.models import remat, splash
from tsdsr_jax.models.extent import region_mask, zero_outside
from tsdsr_jax.models.lora import Conv, Dense
from tsdsr_jax.models.mmdit import ATTENTION_IMPLS

Dtype = Any
PyTree = Any

EPS = 1e-6  # every GroupNorm of diffusers' VAE
_IGNORED_KEYS = {"sample_size", "latents_mean", "latents_std"}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


@dataclass(frozen=True)
class VAEConfig:
    """diffusers' ``AutoencoderKL`` config (same names and defaults) plus the compute ``dtype``,
    the ``remat_policy`` of training, its ``remat_norms`` (see the module's docstring) and the
    mid-block's ``attention_impl`` (MMDiT's names)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True  # a float16 run computes this VAE in float32
    dtype: Dtype = jnp.float32
    remat_policy: str | None = None  # rematerialise each down/up/mid block: see remat.POLICIES
    remat_norms: bool = False  # recompute each GroupNorm (and its SiLU) in the backward pass
    attention_impl: str | None = None  # "splash": the Pallas TPU kernel; else XLA, chunked

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        remat.check(self.remat_policy)
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unsupported attention_impl {self.attention_impl!r}")

    @classmethod
    def sd3(cls, dtype: Dtype = jnp.float32) -> VAEConfig:
        """The Stable Diffusion 3 VAE."""
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   latent_channels=16, norm_num_groups=32, scaling_factor=1.5305,
                   shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                   dtype=dtype)

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any]) -> VAEConfig:
        """A config from diffusers' ``config.json`` (or :meth:`to_dict`); rejects what we lack."""
        kwargs = {}
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key == "act_fn":
                if value not in ("silu", "swish"):
                    raise ValueError(f"unsupported act_fn {value!r}: only 'silu'")
            elif key in _BLOCK_TYPES:
                if any(t != _BLOCK_TYPES[key] for t in value):
                    raise ValueError(f"unsupported {key} {list(value)}: only {_BLOCK_TYPES[key]}")
            elif key in fields:
                kwargs[key] = value
            else:
                raise ValueError(f"unsupported AutoencoderKL config key {key!r}")
        config = cls(**kwargs)
        for key in _BLOCK_TYPES.keys() & d.keys():
            if len(d[key]) != len(config.block_out_channels):
                raise ValueError(f"{len(d[key])} {key} for {len(config.block_out_channels)} "
                                 "block_out_channels")
        return config

    def compute_dtype(self, dtype: Dtype) -> jnp.dtype:
        """The VAE's compute dtype for a run in ``dtype``: float32 instead of float16 where
        ``force_upcast`` says so (as diffusers does; SD3's VAE does)."""
        dtype = jnp.dtype(dtype)
        return jnp.dtype(jnp.float32) if dtype == jnp.float16 and self.force_upcast else dtype

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD3's four blocks)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``dtype`` as its name)."""
        return dataclasses.asdict(self) | {"dtype": self.dtype.name,
                                           "block_out_channels": list(self.block_out_channels)}


def group_moments(x: jax.Array, num_groups: int, mask: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Per-sample, per-group float32 ``(mean, var)`` of NHWC ``x``, each (N, num_groups), over
    all pixels or those where ``mask`` (N, H, W, 1) is true (the first pixel must be).

    One pass over ``x``: each channel's sum and sum of squares in float32, taken about the
    channel's first pixel (so that a large mean cancels nothing), then merged into groups on
    (N, C) arrays (the parallel-variance formula)."""
    n, c = x.shape[0], x.shape[-1]
    flat = x.reshape(n, -1, c)
    shift = flat[:, 0].astype(jnp.float32)
    d = flat.astype(jnp.float32) - shift[:, None]
    if mask is None:
        count = jnp.full((n, 1), flat.shape[1], jnp.float32)
    else:
        weight = mask.reshape(n, -1, 1).astype(jnp.float32)
        d = d * weight
        count = weight.sum(1)
    s1, s2 = d.sum(1), jnp.square(d).sum(1)  # count, s1 and s2: (N, C) or (N, 1)
    channel_mean = shift + s1 / count
    channel_m2 = s2 - s1 * s1 / count  # sum of squared deviations from the channel mean
    grouped = lambda a: a.reshape(n, num_groups, c // num_groups)  # noqa: E731
    mean = grouped(channel_mean).mean(-1)
    m2 = (grouped(channel_m2)
          + count[..., None] * jnp.square(grouped(channel_mean) - mean[..., None])).sum(-1)
    return mean, m2 / (count * (c // num_groups))


class GroupNorm(nn.Module):
    """torch ``GroupNorm`` over NHWC; statistics in float32, output in the input's dtype, then
    SiLU where ``silu``.

    The statistics come from one of: the whole input; the region inside ``extent`` (see the
    module's docstring); or ``stats``, a given ``(mean, var)`` pair shaped like
    :func:`group_moments`' result (the tiled VAE of :mod:`tsdsr_jax.inference.tiling` passes
    global ones).
    """

    num_groups: int
    silu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, extent: jax.Array | None = None,
                 stats: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        if stats is not None:
            mean, var = stats
        else:
            mask = None if extent is None else region_mask(extent, *x.shape[1:3])
            mean, var = group_moments(x, self.num_groups, mask)
        h = x.astype(jnp.float32).reshape(x.shape[0], -1, self.num_groups, c // self.num_groups)
        # the one-pass variance can round to slightly below 0 (rsqrt would give NaN)
        var = jnp.maximum(var, 0.0)
        h = (h - mean[:, None, :, None]) * jax.lax.rsqrt(var[:, None, :, None] + EPS)
        h = (h.reshape(x.shape) * scale + bias).astype(x.dtype)
        return nn.silu(h) if self.silu else h


@functools.cache
def norm_class(remat_norms: bool) -> type[GroupNorm]:
    """``GroupNorm``, or with ``remat_norms`` one whose backward pass recomputes it (nothing
    of it is stored but its input)."""
    return nn.remat(GroupNorm, policy=remat.POLICIES["full"]) if remat_norms else GroupNorm


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding."""

    features: int
    groups: int
    dtype: Dtype
    remat_norms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        norm = norm_class(self.remat_norms)
        h = norm(self.groups, silu=True, name="norm1")(x, extent)
        h = Conv(self.features, padding=1, dtype=self.dtype, name="conv1")(zero_outside(h, extent))
        h = norm(self.groups, silu=True, name="norm2")(h, extent)
        h = Conv(self.features, padding=1, dtype=self.dtype, name="conv2")(zero_outside(h, extent))
        if x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


QUERY_CHUNK = 4096  # queries per step of the VAE attention: bounds its logits' memory


def single_head_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          query_chunk: int = QUERY_CHUNK,
                          key_mask: jax.Array | None = None) -> jax.Array:
    """softmax(q kᵀ / √c) v over (B, T, C), float32 logits; queries in chunks of
    ``query_chunk`` (one at a time, exact) so that memory grows as T·chunk, not T². With
    ``key_mask`` (B, T) bools, only the keys where it is true are attended to."""
    def attend(q_chunk: jax.Array) -> jax.Array:
        logits = jnp.einsum("bqc,bkc->bqk", q_chunk, k, preferred_element_type=jnp.float32)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, :], logits, -jnp.inf)
        weights = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1).astype(v.dtype)
        return jnp.einsum("bqk,bkc->bqc", weights, v, preferred_element_type=jnp.float32)

    b, t, c = q.shape
    if t <= query_chunk:
        return attend(q)
    n = -(-t // query_chunk)
    chunks = jnp.pad(q, ((0, 0), (0, n * query_chunk - t), (0, 0)))
    chunks = chunks.reshape(b, n, query_chunk, c).swapaxes(0, 1)
    out = jax.lax.map(attend, chunks).swapaxes(0, 1)
    return out.reshape(b, n * query_chunk, c)[:, :t]


class Attention(nn.Module):
    """The VAE mid-block self-attention: one head over all H·W positions, residual."""

    groups: int
    dtype: Dtype
    attention_impl: str | None = None
    remat_norms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        b, height, width, c = x.shape
        h = norm_class(self.remat_norms)(self.groups, name="group_norm")(x, extent)
        h = h.reshape(b, height * width, c)
        q, k, v = (Dense(c, dtype=self.dtype, name=name)(h) for name in ("to_q", "to_k", "to_v"))
        keys = None if extent is None else region_mask(extent, height, width).reshape(b, -1)
        if self.attention_impl == "splash":
            h = splash.splash_attention(q[:, :, None], k[:, :, None], v[:, :, None], keys)[:, :, 0]
        else:
            h = single_head_attention(q, k, v, key_mask=keys)
        h = Dense(c, dtype=self.dtype, name="to_out.0")(h.astype(v.dtype))
        return x + h.reshape(x.shape)


class Downsample(nn.Module):
    """Pad bottom/right by one, then a 3x3 stride-2 conv (``Downsample2D`` with padding 0)."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        return Conv(x.shape[-1], strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                    name="conv")(zero_outside(x, extent))


# Nearest ×2 followed by a 3-tap kernel k equals, along each axis, the 4-tap kernel
# (k0, k0 + k1, k1 + k2, k2) over the input with a zero inserted between every two pixels.
NEAREST_X2_TAPS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]], np.float32)


class NearestX2Conv(nn.Module):
    """A 3x3 conv (padding 1) of the nearest-neighbour x2 upsampled input, computed as one
    transposed convolution of the input itself (stride 2, a 4x4 kernel): the upsampled tensor is
    never built, and each output takes 4 taps instead of 9. Exact up to the rounding of the
    summed taps. Its parameters are the 3x3 conv's (``kernel``, ``bias``); no LoRA."""

    features: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        # built reversed and reversed back: XLA's GPU compiler then runs a transposed
        # convolution (cuDNN's backward-data kernel) instead of convolving a zero-filled copy
        taps = jnp.asarray(NEAREST_X2_TAPS[::-1])
        kernel = jnp.einsum("ti,ijcd,sj->tscd", taps, kernel.astype(jnp.float32), taps)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), jax.lax.rev(kernel.astype(self.dtype), (0, 1)),
            window_strides=(1, 1),
            padding=((2, 2), (2, 2)), lhs_dilation=(2, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(self.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (as one :class:`NearestX2Conv`)."""

    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        return NearestX2Conv(x.shape[-1], self.dtype, name="conv")(zero_outside(x, extent))


class MidBlock(nn.Module):
    """ResNet, optional attention, ResNet (diffusers' ``UNetMidBlock2D``)."""

    groups: int
    add_attention: bool
    dtype: Dtype
    attention_impl: str | None = None
    remat_norms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        resnet = functools.partial(ResnetBlock, c, self.groups, self.dtype, self.remat_norms)
        x = resnet(name="resnets.0")(x, extent)
        if self.add_attention:
            x = Attention(self.groups, self.dtype, self.attention_impl, self.remat_norms,
                          name="attentions.0")(x, extent)
        return resnet(name="resnets.1")(x, extent)


class ResnetStack(nn.Module):
    """``DownEncoderBlock2D`` / ``UpDecoderBlock2D``: ResNets, then an optional resampler."""

    features: int
    num_layers: int
    groups: int
    resample: str | None  # "down", "up" or None
    dtype: Dtype
    remat_norms: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        """``extent`` is at the input's resolution (the output's is halved or doubled)."""
        for i in range(self.num_layers):
            x = ResnetBlock(self.features, self.groups, self.dtype, self.remat_norms,
                            name=f"resnets.{i}")(x, extent)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsamplers.0")(x, extent)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsamplers.0")(x, extent)
        return x


# (batch, height, width, channels) activations: split like the batch where a mesh and rules are
# active (tsdsr_jax/sharding.py), untouched otherwise
_IMAGES = ("activation_batch", None, None, None)


def _blocks(config: VAEConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    """The ``ResnetStack`` and ``MidBlock`` classes, rematerialised as the config says."""
    if config.remat_policy is None:
        return ResnetStack, MidBlock
    policy = remat.POLICIES[config.remat_policy]
    return (nn.remat(ResnetStack, policy=policy),
            nn.remat(MidBlock, policy=policy))


class Encoder(nn.Module):
    """Image (N, H, W, in_channels) -> posterior moments (N, H/f, W/f, 2·latent_channels)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        cfg, dtype = self.config, self.config.dtype
        channels = cfg.block_out_channels
        stack, mid = _blocks(cfg)
        x = Conv(channels[0], padding=1, dtype=dtype, name="conv_in")(zero_outside(x, extent))
        for i, c in enumerate(channels):
            down = i < len(channels) - 1
            x = stack(c, cfg.layers_per_block, cfg.norm_num_groups, "down" if down else None,
                      dtype, cfg.remat_norms, name=f"down_blocks.{i}")(x, extent)
            x = nn.with_logical_constraint(x, _IMAGES)
            if down and extent is not None:
                extent = extent // 2
        x = mid(cfg.norm_num_groups, cfg.mid_block_add_attention, dtype, cfg.attention_impl,
                cfg.remat_norms, name="mid_block")(x, extent)
        x = norm_class(cfg.remat_norms)(cfg.norm_num_groups, silu=True, name="conv_norm_out")(
            x, extent)
        return Conv(2 * cfg.latent_channels, padding=1, dtype=dtype, name="conv_out")(
            zero_outside(x, extent))


class Decoder(nn.Module):
    """Latent (N, h, w, latent_channels) -> image (N, h·f, w·f, out_channels)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        cfg, dtype = self.config, self.config.dtype
        channels = cfg.block_out_channels[::-1]
        stack, mid = _blocks(cfg)
        x = Conv(channels[0], padding=1, dtype=dtype, name="conv_in")(zero_outside(z, extent))
        x = mid(cfg.norm_num_groups, cfg.mid_block_add_attention, dtype, cfg.attention_impl,
                cfg.remat_norms, name="mid_block")(x, extent)
        for i, c in enumerate(channels):
            up = i < len(channels) - 1
            x = stack(c, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if up else None,
                      dtype, cfg.remat_norms, name=f"up_blocks.{i}")(x, extent)
            x = nn.with_logical_constraint(x, _IMAGES)
            if up and extent is not None:
                extent = extent * 2
        x = norm_class(cfg.remat_norms)(cfg.norm_num_groups, silu=True, name="conv_norm_out")(
            x, extent)
        return Conv(cfg.out_channels, padding=1, dtype=dtype, name="conv_out")(
            zero_outside(x, extent))


class AutoencoderKL(nn.Module):
    """The KL autoencoder; ``encode`` and ``decode`` are methods for ``apply(method=...)``."""

    config: VAEConfig

    def setup(self) -> None:
        cfg = self.config
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = (Conv(2 * latent, (1, 1), dtype=cfg.dtype)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (Conv(latent, (1, 1), dtype=cfg.dtype)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: jax.Array, extent: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
        """Image in [-1, 1], NHWC -> the posterior's ``(mean, logvar)``, logvar in [-30, 20]."""
        h = self.encoder(x, extent)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array, extent: jax.Array | None = None) -> jax.Array:
        """Latent (unscaled), NHWC -> image."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, extent)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean (also what ``init`` traces)."""
        return self.decode(self.encode(x)[0])


def sample_posterior(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
    """A draw ``mean + exp(logvar / 2) · noise`` from the diagonal Gaussian posterior, with
    ``noise`` ~ N(0, 1)."""
    return mean + jnp.exp(0.5 * logvar) * noise


def init_params(rng: jax.Array, config: VAEConfig) -> PyTree:
    """Freshly initialised float32 parameters."""
    size = config.downscale_factor
    x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    return jax.jit(AutoencoderKL(config).init)(rng, x)["params"]


def abstract_params(config: VAEConfig) -> PyTree:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating."""
    return jax.eval_shape(functools.partial(init_params, config=config), jax.random.key(0))
