"""The SD3 / SD3.5 MMDiT transformer (diffusers' ``SD3Transformer2DModel``) in Flax linen.

Module names are diffusers' names (``transformer_blocks.3.attn.to_q``), so a parameter's dotted
path is its diffusers state-dict key with ``kernel``/``scale`` for ``weight`` (see
:mod:`tsdsr_jax.conversion.torch_layout`). Latents are NHWC::

    model = MMDiT(MMDiTConfig.sd3_medium())
    v = model.apply({'params': params}, latents, timestep, prompt_embeds, pooled_embeds)

Parameters are float32; ``config.dtype`` is the compute dtype. Norm statistics are float32.

Latents of several sizes can share one batch, each at the top left of a common padded size, given
their :class:`PatchLayout` (:func:`patch_layout`): each image's tokens then get the position
embeddings of its own size, attention sees its own tokens only, and its output equals its output
alone (the padding's output is undefined).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.models import remat, splash
from tsdsr_jax.models.lora import Conv, Dense

PyTree = Any

_QK_NORMS = (None, "rms_norm")
# None: jax chooses; "splash": the Pallas TPU kernel (tsdsr_jax.models.splash)
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash")


@dataclass(frozen=True)
class MMDiTConfig:
    """diffusers' ``SD3Transformer2DModel`` config (same field names and defaults), plus the
    compute ``dtype`` and the ``attention_impl``: given to ``jax.nn.dot_product_attention``
    (None: jax chooses; "xla"; "cudnn"), or "splash", the Pallas kernel for TPUs."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat_policy: str | None = None  # rematerialise each block in training: see remat.POLICIES

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
        set_("dtype", jnp.dtype(self.dtype))
        if self.out_channels is None:
            set_("out_channels", self.in_channels)
        if self.qk_norm not in _QK_NORMS:
            raise ValueError(f"unsupported qk_norm {self.qk_norm!r} (supported: {_QK_NORMS})")
        if self.pos_embed_max_size is None:
            raise ValueError("unsupported pos_embed_max_size None (SD3 crops a fixed table)")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"unsupported caption_projection_dim {self.caption_projection_dim}: "
                             f"joint attention needs heads * head_dim = {self.inner_dim}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unsupported attention_impl {self.attention_impl!r}")
        remat.check(self.remat_policy)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any], **overrides: Any) -> MMDiTConfig:
        """From a diffusers ``transformer/config.json`` dict (or :meth:`to_dict`); keys starting
        with ``_`` are ignored, any other unknown key is a ValueError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if not k.startswith("_")} | overrides
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unsupported MMDiT config keys: {unknown}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (dtype as its name) that :meth:`from_diffusers` reads back."""
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d | {"dtype": self.dtype.name}

    @classmethod
    def sd3_medium(cls, **overrides: Any) -> MMDiTConfig:
        """stabilityai/stable-diffusion-3-medium-diffusers (about 2.03 B parameters)."""
        return cls(**(dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                           attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                           caption_projection_dim=1536, pooled_projection_dim=2048,
                           out_channels=16, pos_embed_max_size=192) | overrides))

    @classmethod
    def sd35_medium(cls, **overrides: Any) -> MMDiTConfig:
        """stabilityai/stable-diffusion-3.5-medium: dual attention in blocks 0-12, RMS qk-norm."""
        return cls.sd3_medium(**(dict(pos_embed_max_size=384, qk_norm="rms_norm",
                                      dual_attention_layers=tuple(range(13))) | overrides))

    @classmethod
    def sd35_large(cls, **overrides: Any) -> MMDiTConfig:
        """stabilityai/stable-diffusion-3.5-large: 38 blocks of 38 heads, RMS qk-norm."""
        return cls.sd3_medium(**(dict(num_layers=38, num_attention_heads=38,
                                      caption_projection_dim=2432, qk_norm="rms_norm") | overrides))


# --------------------------------------------------------------------------- embeddings


def timestep_embedding(timestep: jax.Array, dim: int = 256) -> jax.Array:
    """diffusers' sinusoid (flip_sin_to_cos, shift 0): ``[cos(t f), sin(t f)]``, float32.

    The frequencies ``f = 10000^(-i/half)`` are rounded from float64; torch's float32 ``exp`` is
    off by an ulp for some, which moves ``t f`` by up to ~1e-4 at t = 1000.
    """
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half).astype(np.float32)
    args = timestep.astype(jnp.float32)[:, None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = pos.astype(np.float64)[:, None] * omega
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def pos_embed_axes(config: MMDiTConfig, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The centred crop of diffusers' 2-D sin-cos table for ``height x width`` patches, as its two
    halves: ``x_emb (width, D/2)`` (the first D/2 channels, by column) and ``y_emb (height, D/2)``
    (the last D/2, by row). Grid positions are ``arange(max) * (sample_size / patch) / max``."""
    size = config.pos_embed_max_size
    if height > size or width > size:
        raise ValueError(f"latent of {height}x{width} patches exceeds pos_embed_max_size {size}")
    base = config.sample_size // config.patch_size
    pos = np.arange(size, dtype=np.float32) / np.float32(size / base)
    top, left = (size - height) // 2, (size - width) // 2
    half = config.inner_dim // 2
    return _sincos_1d(half, pos[left:left + width]), _sincos_1d(half, pos[top:top + height])


class PatchLayout(NamedTuple):
    """Where each image's patches lie in a batch of latents padded to one grid of T patches."""

    order: jax.Array   # (B, T) int32: the padded grid's patch (row-major) at each token; the
                       # image's own patches first, in its own row-major order, then the padding's
    rows: jax.Array    # (B, T) int32: each token's row in the uncropped position table
    cols: jax.Array    # (B, T) int32: its column
    length: jax.Array  # (B,) int32: how many tokens are the image's own


def patch_layout(config: MMDiTConfig, grid: tuple[int, int],
                 sizes: list[tuple[int, int]]) -> PatchLayout:
    """The :class:`PatchLayout` (numpy) of latents of ``sizes`` (height, width), each at the top
    left of a latent of size ``grid``; all in latent pixels, multiples of the patch size."""
    p, table = config.patch_size, config.pos_embed_max_size
    grid_h, grid_w = grid[0] // p, grid[1] // p
    everything = np.arange(grid_h * grid_w)
    order, rows, cols, length = [], [], [], []
    for height, width in sizes:
        h, w = height // p, width // p
        if h > grid_h or w > grid_w or height % p or width % p:
            raise ValueError(f"latent of {height}x{width} does not fill whole patches of "
                             f"{grid[0]}x{grid[1]}")
        if h > table or w > table:
            raise ValueError(f"latent of {h}x{w} patches exceeds pos_embed_max_size {table}")
        r, c = np.divmod(np.arange(h * w), w)
        own = r * grid_w + c
        padding = np.setdiff1d(everything, own)
        order.append(np.concatenate([own, padding]))
        zeros = np.zeros_like(padding)
        rows.append(np.concatenate([(table - h) // 2 + r, zeros]))
        cols.append(np.concatenate([(table - w) // 2 + c, zeros]))
        length.append(h * w)
    return PatchLayout(*(np.asarray(a, np.int32) for a in (order, rows, cols, length)))


# --------------------------------------------------------------------------- layers


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32."""
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    var = jnp.square(centred).mean(-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """RMS norm over the last axis with a ``scale`` parameter, computed in float32."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(x.dtype)


class _MLP(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (TimestepEmbedding, PixArtAlphaTextProjection)."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class _TimeTextEmbed(nn.Module):
    """``temb = MLP(sinusoid(t)) + MLP(pooled)`` (CombinedTimestepTextProjEmbeddings)."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        t = timestep_embedding(timestep).astype(self.dtype)
        return (_MLP(self.features, self.dtype, name="timestep_embedder")(t)
                + _MLP(self.features, self.dtype, name="text_embedder")(pooled))


class _PatchEmbed(nn.Module):
    """Patchify conv ``proj`` (NHWC -> (B, h*w, D) tokens) plus the cropped position table."""

    config: MMDiTConfig

    @nn.compact
    def __call__(self, x: jax.Array, layout: PatchLayout | None = None) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        y = Conv(cfg.inner_dim, (p, p), (p, p), dtype=cfg.dtype, name="proj")(x)
        b, h, w, d = y.shape
        if layout is not None:  # the tokens in the layout's order, each image's own positions
            y = jnp.take_along_axis(y.reshape(b, h * w, d), layout.order[..., None], axis=1)
            size = cfg.pos_embed_max_size
            x_emb, y_emb = pos_embed_axes(cfg, size, size)
            pos = jnp.concatenate([jnp.asarray(x_emb)[layout.cols],
                                   jnp.asarray(y_emb)[layout.rows]], axis=-1)
            return (y + pos).astype(y.dtype)
        x_emb, y_emb = pos_embed_axes(cfg, h, w)
        pos = jnp.concatenate([jnp.broadcast_to(x_emb[None], (h, w, d // 2)),
                               jnp.broadcast_to(y_emb[:, None], (h, w, d // 2))], axis=-1)
        return (y + pos).astype(y.dtype).reshape(b, h * w, d)


class _AdaLN(nn.Module):
    """``norm1`` / ``norm1_context`` / ``norm_out``: an adaptive LayerNorm's modulation vectors
    ``linear(silu(temb))``, (B, features); the norm itself has no parameters (:func:`_layer_norm`).
    AdaLN-Zero splits them into (shift, scale, gate) for attention and MLP (and attn2's, SD3.5);
    AdaLN-Continuous (``norm_out``, the last ``norm1_context``) into (scale, shift), this order."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, temb: jax.Array) -> jax.Array:
        return Dense(self.features, dtype=self.dtype, name="linear")(nn.silu(temb))


class _GELUProj(nn.Module):
    """``net.0`` of a FeedForward: Dense ``proj`` then tanh-GELU."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.gelu(Dense(self.features, dtype=self.dtype, name="proj")(x), approximate=True)


class _FeedForward(nn.Module):
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = _GELUProj(4 * dim, self.dtype, name="net.0")(x)
        return Dense(dim, dtype=self.dtype, name="net.2")(x)


# cuDNN's flash attention tiles the sequence by 128 and, under differentiation, refuses odd
# lengths (SD3 at 512²: 1024 image + 333 text = 1357 tokens); its joint sequence is padded to this.
CUDNN_SEQ_MULTIPLE = 128


# cuDNN's fused attention (its flash kernels) needs an Ampere or newer GPU
CUDNN_MIN_CAPABILITY = (8, 0)


# The backend each kernel needs (they can still be compiled for it anywhere, as tsdsr_jax.aot
# does), and the kernel that "auto" picks on each (elsewhere: jax's default)
KERNEL_BACKENDS = {"cudnn": "gpu", "splash": "tpu"}
AUTO_KERNELS = {"gpu": "cudnn", "tpu": "splash"}


def resolve_attention(implementation: str | None, platform: str) -> str | None:
    """``implementation``, where "auto" is the kernel of ``platform`` (gpu, tpu, cpu)."""
    return AUTO_KERNELS.get(platform) if implementation == "auto" else implementation


def not_runnable_here(implementation: str | None) -> str | None:
    """Why this host's backend cannot run the attention ``implementation``, or None."""
    needed, here = KERNEL_BACKENDS.get(implementation), jax.default_backend()
    if needed in (None, here):
        return None
    return f"needs a {needed.upper()} (jax runs on {here} here)"


def attention_here(implementation: str | None) -> tuple[str | None, str | None]:
    """``implementation``, or XLA's attention where cuDNN's is asked for on a GPU older than
    compute capability 8.0 (a V100, a T4), with the note line that says so (else None)."""
    if implementation != "cudnn" or jax.default_backend() != "gpu":
        return implementation, None
    old = sorted({d.compute_capability for d in jax.local_devices()
                  if tuple(map(int, d.compute_capability.split("."))) < CUDNN_MIN_CAPABILITY})
    if not old:
        return implementation, None
    return "xla", (f"note: cuDNN's fused attention needs compute capability 8.0 or newer (this "
                   f"GPU: {old[0]}); XLA's attention instead, slower")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          implementation: str | None = None,
                          pad_multiple: int | None = None,
                          lengths: jax.Array | None = None) -> jax.Array:
    """Softmax attention over ``(B, L, heads, head_dim)``; with ``pad_multiple`` the sequence is
    zero-padded to a multiple of it, the true length is given as the query and key lengths (the
    padding is masked out exactly) and the padded rows are dropped. ``"cudnn"`` always pads, to
    :data:`CUDNN_SEQ_MULTIPLE`. ``lengths`` (B,): only each sequence's first ``lengths`` tokens
    are real; the rest attend to nothing and are attended to by nothing (their output is 0)."""
    length = q.shape[1]
    if implementation == "splash":  # pads and masks itself
        if lengths is None:
            return splash.splash_attention(q, k, v)
        real = jnp.arange(length)[None, :] < lengths[:, None]
        return _zero_beyond(splash.splash_attention(q, k, v, real), lengths)
    if implementation == "cudnn":
        pad_multiple = pad_multiple or CUDNN_SEQ_MULTIPLE
    pad = -length % pad_multiple if pad_multiple else 0
    if not pad and lengths is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    real = jnp.full((q.shape[0],), length, jnp.int32) if lengths is None else lengths
    out = jax.nn.dot_product_attention(q, k, v, implementation=implementation,
                                       query_seq_lengths=real, key_value_seq_lengths=real)
    out = out[:, :length]
    return out if lengths is None else _zero_beyond(out, lengths)


def _zero_beyond(out: jax.Array, lengths: jax.Array) -> jax.Array:
    """``out`` (B, L, ...) with each sequence's rows from its ``lengths`` on set to 0."""
    keep = jnp.arange(out.shape[1])[None, :] < lengths[:, None]
    return jnp.where(keep.reshape(*keep.shape, *(1,) * (out.ndim - 2)), out,
                     jnp.zeros((), out.dtype))


class _Attention(nn.Module):
    """diffusers' ``Attention`` with the joint processor. Image tokens use ``to_q/k/v``; with a
    context, its tokens use ``add_{q,k,v}_proj`` and join the same softmax. The context output
    goes through ``to_add_out`` unless ``context_pre_only`` (then it is dropped). With
    ``lengths`` (B,), only each sample's first ``lengths`` image tokens take part (the context
    then comes first in the joint sequence, so that all padding is at its end)."""

    config: MMDiTConfig
    context_pre_only: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None,
                 lengths: jax.Array | None = None
                 ) -> jax.Array | tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        dense = functools.partial(Dense, cfg.inner_dim, dtype=cfg.dtype)

        def qkv(tokens, names, norms):
            q, k, v = (dense(name=n)(tokens).reshape(*tokens.shape[:2], cfg.num_attention_heads, -1)
                       for n in names)
            if cfg.qk_norm:
                q, k = RMSNorm(name=norms[0])(q), RMSNorm(name=norms[1])(k)
            return q, k, v

        q, k, v = qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if context is None:
            out = dot_product_attention(q, k, v, cfg.attention_impl, lengths=lengths)
            return dense(name="to_out.0")(out.reshape(*out.shape[:2], cfg.inner_dim))
        cq, ck, cv = qkv(context, ("add_q_proj", "add_k_proj", "add_v_proj"),
                         ("norm_added_q", "norm_added_k"))
        if lengths is None:
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
            out = dot_product_attention(q, k, v, cfg.attention_impl)
            x_part, c_part = jnp.split(out, [x.shape[1]], axis=1)
        else:
            q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
            out = dot_product_attention(q, k, v, cfg.attention_impl,
                                        lengths=lengths + context.shape[1])
            c_part, x_part = jnp.split(out, [context.shape[1]], axis=1)
        x_out = dense(name="to_out.0")(x_part.reshape(*x_part.shape[:2], cfg.inner_dim))
        if self.context_pre_only:
            return x_out, None
        return x_out, dense(name="to_add_out")(c_part.reshape(*c_part.shape[:2], cfg.inner_dim))


class JointTransformerBlock(nn.Module):
    """One MMDiT block: AdaLN-Zero on both streams, joint attention, gated MLPs. The
    ``context_pre_only`` (last) block only reads the context and returns ``None`` for it;
    ``dual_attention`` (SD3.5) adds ``attn2``, self-attention over the image tokens."""

    config: MMDiTConfig
    context_pre_only: bool = False
    dual_attention: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array | None,
                 modulation: Mapping[str, jax.Array] | None = None,
                 lengths: jax.Array | None = None) -> tuple[jax.Array | None, jax.Array]:
        """``modulation``: this block's ``norm1`` and ``norm1_context`` outputs, precomputed
        (:class:`Conditioning`), in place of ``temb``; ``lengths``: each sample's count of real
        image tokens (:class:`PatchLayout`)."""
        cfg = self.config

        def adaln(name: str, chunks: int) -> list[jax.Array]:
            emb = (modulation[name] if modulation is not None else
                   _AdaLN(chunks * cfg.inner_dim, cfg.dtype, name=name)(temb))
            return jnp.split(emb, chunks, axis=-1)

        x_norm = _layer_norm(x)
        mods = adaln("norm1", 9 if self.dual_attention else 6)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if self.context_pre_only:
            c_scale, c_shift = adaln("norm1_context", 2)
            c_in = _modulate(_layer_norm(context), c_shift, c_scale)
        else:
            c_mods = adaln("norm1_context", 6)
            c_in = _modulate(_layer_norm(context), c_mods[0], c_mods[1])

        attn = _Attention(cfg, self.context_pre_only, name="attn")
        x_attn, c_attn = attn(_modulate(x_norm, shift_msa, scale_msa), c_in, lengths)
        x = x + gate_msa[:, None] * x_attn
        if self.dual_attention:
            shift2, scale2, gate2 = mods[6:]
            attn2 = _Attention(cfg, name="attn2")
            x = x + gate2[:, None] * attn2(_modulate(x_norm, shift2, scale2), None, lengths)
        ff = _FeedForward(cfg.dtype, name="ff")(_modulate(_layer_norm(x), shift_mlp, scale_mlp))
        x = x + gate_mlp[:, None] * ff
        if self.context_pre_only:
            return None, x

        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
        context = context + c_gate_msa[:, None] * c_attn
        c_ff = _FeedForward(cfg.dtype, name="ff_context")(
            _modulate(_layer_norm(context), c_shift_mlp, c_scale_mlp))
        return context + c_gate_mlp[:, None] * c_ff, x


# (batch, tokens, width) activations: split like the batch where a mesh and rules are active
# (tsdsr_jax/sharding.py), untouched otherwise
_TOKENS = ("activation_batch", None, None)


class Conditioning(NamedTuple):
    """What the transformer derives from the timestep and the prompt alone: the projected prompt
    tokens (``context_embedder``) and every adaptive norm's modulation vectors, keyed by module
    path (``transformer_blocks.3.norm1``, ``norm_out``). When both are fixed, as in one-step
    inference, :func:`condition` computes them once, and the network neither recomputes them
    nor holds the weights behind them (:func:`without_conditioning`)."""

    context: jax.Array                  # (B, L, D)
    modulation: dict[str, jax.Array]    # (B, chunks * D)


_CONDITIONING = ("time_text_embed", "context_embedder", "norm1", "norm1_context", "norm_out")


class MMDiT(nn.Module):
    """``SD3Transformer2DModel``: ``(B,H,W,C) latents, (B,) timesteps, (B,L,joint_attention_dim)
    prompt embeddings, (B,pooled_projection_dim) pooled embeddings -> (B,H,W,out_channels)`` in
    ``config.dtype``. H and W are latent pixels (patchified inside). With a precomputed
    ``conditioning`` (batch 1 or B) the timesteps and prompts are not given; ``layout`` places
    latents of several sizes in the batch (:func:`patch_layout`)."""

    config: MMDiTConfig

    @nn.compact
    def __call__(self, hidden_states: jax.Array, timestep: jax.Array | None = None,
                 encoder_hidden_states: jax.Array | None = None,
                 pooled_projections: jax.Array | None = None, *,
                 conditioning: Conditioning | None = None,
                 layout: PatchLayout | None = None) -> jax.Array:
        cfg = self.config
        b, height, width, _ = hidden_states.shape
        p = cfg.patch_size
        x = _PatchEmbed(cfg, name="pos_embed")(hidden_states, layout)
        lengths = None if layout is None else layout.length
        temb, modulation = None, None
        if conditioning is None:
            temb = _TimeTextEmbed(cfg.inner_dim, cfg.dtype, name="time_text_embed")(
                timestep, pooled_projections)
            context = Dense(cfg.caption_projection_dim, dtype=cfg.dtype,
                            name="context_embedder")(encoder_hidden_states)
        else:
            context, modulation = conditioning
            context = jnp.broadcast_to(context, (b, *context.shape[1:]))
        block_class = JointTransformerBlock
        if cfg.remat_policy is not None:
            block_class = nn.remat(JointTransformerBlock, policy=remat.POLICIES[cfg.remat_policy])
        for i in range(cfg.num_layers):
            name = f"transformer_blocks.{i}"
            block = block_class(cfg, context_pre_only=i == cfg.num_layers - 1,
                                dual_attention=i in cfg.dual_attention_layers, name=name)
            context, x = block(x, context, temb, modulation and {
                k: modulation[f"{name}.{k}"] for k in ("norm1", "norm1_context")}, lengths)
            x = nn.with_logical_constraint(x, _TOKENS)
            if context is not None:
                context = nn.with_logical_constraint(context, _TOKENS)
        emb = (modulation["norm_out"] if modulation is not None else
               _AdaLN(2 * cfg.inner_dim, cfg.dtype, name="norm_out")(temb))
        scale, shift = jnp.split(emb, 2, axis=-1)
        x = _modulate(_layer_norm(x), shift, scale)
        x = Dense(p * p * cfg.out_channels, dtype=cfg.dtype, name="proj_out")(x)
        if layout is not None:  # back to the padded grid's order
            x = jnp.zeros_like(x).at[jnp.arange(b)[:, None], layout.order].set(x)
        h, w = height // p, width // p
        x = x.reshape(b, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * p, w * p, cfg.out_channels)


def condition(config: MMDiTConfig, params: PyTree, timestep: jax.Array,
              encoder_hidden_states: jax.Array, pooled_projections: jax.Array) -> Conditioning:
    """The :class:`Conditioning` of (B,) timesteps and prompts, computed by the same layers as
    the forward, from ``params`` with any LoRA merged into them."""
    dtype = config.dtype
    temb = _TimeTextEmbed(config.inner_dim, dtype).apply(
        {"params": params["time_text_embed"]}, timestep, pooled_projections)
    context = Dense(config.caption_projection_dim, dtype=dtype).apply(
        {"params": params["context_embedder"]}, encoder_hidden_states)
    norms = {"norm_out": params["norm_out"]}
    for i in range(config.num_layers):
        block = params[f"transformer_blocks.{i}"]
        norms |= {f"transformer_blocks.{i}.{k}": block[k] for k in ("norm1", "norm1_context")}
    return Conditioning(context, {
        path: _AdaLN(norm["linear"]["kernel"].shape[-1], dtype).apply({"params": norm}, temb)
        for path, norm in norms.items()})


def without_conditioning(params: PyTree) -> PyTree:
    """``params`` less the layers that :func:`condition` replaces."""
    return {k: (without_conditioning(v) if isinstance(v, Mapping) else v)
            for k, v in params.items() if k not in _CONDITIONING}


# --------------------------------------------------------------------------- parameters


def _dummy_inputs(config: MMDiTConfig) -> tuple[jax.Array, ...]:
    p = config.patch_size
    return (jnp.zeros((1, p, p, config.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 1, config.joint_attention_dim)),
            jnp.zeros((1, config.pooled_projection_dim)))


def init_params(rng: jax.Array, config: MMDiTConfig) -> PyTree:
    """Randomly initialised float32 parameters (flax default initialisers)."""
    return MMDiT(config).init(rng, *_dummy_inputs(config))["params"]


def abstract_params(config: MMDiTConfig) -> PyTree:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, config=config), jax.random.key(0))
