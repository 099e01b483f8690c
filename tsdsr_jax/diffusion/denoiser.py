"""The SD3 networks as TSD-SR uses them: the transformer's velocity (with classifier-free
guidance), the VAE's latents, and the one-step student that inference and training share.

Latents follow one convention: ``z = (E(x) − shift_factor) · scaling_factor``, and an image is
``D(z / scaling_factor + shift_factor)``. (TSD-SR's converted models have no shift: 0.)
The student super-resolves in one step from σ = 1 (t = 1000, the schedule's first index):
``ẑ_H = z_L − σ v(z_L)`` with the default prompt (paper §3.1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tsdsr_jax.diffusion import schedule
from tsdsr_jax.models.mmdit import Conditioning, MMDiT, PatchLayout
from tsdsr_jax.models.vae import AutoencoderKL, sample_posterior

PyTree = Any
Moments = tuple[jax.Array, jax.Array]  # the VAE posterior's (mean, logvar)
PATCH_SIZE = 2             # SD3's latent patch: latent tiles are multiples of it
MULTIPLE = 8 * PATCH_SIZE  # image sides the networks take: SD3's VAE factor 8 × the patch
STUDENT_SIGMA = float(schedule.sigmas()[0])        # 1.0
STUDENT_TIMESTEP = float(schedule.timesteps()[0])  # 1000.0


@dataclasses.dataclass(frozen=True)
class Networks:
    """The (static) modules; params are passed separately."""

    mmdit: MMDiT
    vae: AutoencoderKL

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.vae.config.shift_factor or 0.0


class Prompts(NamedTuple):
    """Prompt embeddings ``embeds`` (..., L, D) and ``pooled`` (..., P), batched or not."""

    embeds: jax.Array
    pooled: jax.Array

    def batched(self, b: int) -> Prompts:
        """An unbatched prompt repeated over a batch of ``b``."""
        return Prompts(jnp.broadcast_to(self.embeds, (b, *self.embeds.shape)),
                       jnp.broadcast_to(self.pooled, (b, *self.pooled.shape)))


class StudentAdapters(NamedTuple):
    """The student's LoRA: on the transformer and on the VAE encoder."""

    transformer: PyTree
    vae: PyTree


# --------------------------------------------------------------------------- the transformer


def interleave(*parts: jax.Array) -> jax.Array:
    """Arrays (B, ...) as one batch (B·k, ...) with row ``i·k + j`` = ``parts[j][i]``: each
    sample's rows stay together, so a batch split over devices needs no data moved."""
    return jnp.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])


def deinterleave(x: jax.Array, k: int) -> list[jax.Array]:
    """The ``k`` parts of a batch made by :func:`interleave`."""
    x = x.reshape(-1, k, *x.shape[1:])
    return [x[:, j] for j in range(k)]


def velocity(nets: Networks, base: PyTree, adapter: PyTree | None, x: jax.Array,
             timestep: jax.Array, prompts: Prompts | Conditioning,
             layout: PatchLayout | None = None) -> jax.Array:
    """The transformer's prediction ``v ≈ ε − x_0`` with one adapter (or none), float32; given
    the :class:`Conditioning` of ``timestep`` and the prompts, ``timestep`` is not read.
    ``layout`` places latents of several sizes in the batch."""
    variables = {"params": base} if adapter is None else {"params": base, "lora": adapter}
    dtype = nets.mmdit.config.dtype
    if isinstance(prompts, Conditioning):
        out = nets.mmdit.apply(variables, x.astype(dtype), conditioning=prompts, layout=layout)
    else:
        out = nets.mmdit.apply(variables, x.astype(dtype), timestep,
                               prompts.embeds.astype(dtype), prompts.pooled.astype(dtype),
                               layout=layout)
    return out.astype(jnp.float32)


def guided_velocity(nets: Networks, base: PyTree, adapter: PyTree | None, x: jax.Array,
                    timestep: jax.Array, cond: Prompts, null: Prompts, scale: float
                    ) -> jax.Array:
    """Classifier-free guidance in one batched call: ``v_∅ + s (v_c − v_∅)``."""
    both = Prompts(interleave(null.embeds, cond.embeds), interleave(null.pooled, cond.pooled))
    v = velocity(nets, base, adapter, interleave(x, x), interleave(timestep, timestep), both)
    v_null, v_cond = deinterleave(v, 2)
    return v_null + scale * (v_cond - v_null)


# --------------------------------------------------------------------------- the VAE


def encode(nets: Networks, vae: PyTree, image: jax.Array, noise: jax.Array | None = None,
           encoder: Callable[[jax.Array], Moments] | None = None) -> jax.Array:
    """Latents (B, h, w, C) float32 of images (B, H, W, 3) in [−1, 1]: a posterior sample with
    ``noise`` ~ N(0, 1) of the latents' shape, or its mean (``noise=None``). ``vae`` holds the
    variables (``params``, optionally ``lora``); ``encoder`` replaces the plain encoder (tiling)."""
    image = image.astype(nets.vae.config.dtype)
    if encoder is None:
        mean, logvar = nets.vae.apply(vae, image, method="encode")
    else:
        mean, logvar = encoder(image)
    z = mean.astype(jnp.float32)
    if noise is not None:
        z = sample_posterior(z, logvar.astype(jnp.float32), noise)
    return (z - nets.shift_factor) * nets.scaling_factor


def decode(nets: Networks, vae: PyTree, latents: jax.Array,
           decoder: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Images (B, H, W, 3) float32, unclipped, of latents; ``decoder`` replaces the plain
    decoder (tiling)."""
    z = (latents / nets.scaling_factor + nets.shift_factor).astype(nets.vae.config.dtype)
    image = nets.vae.apply(vae, z, method="decode") if decoder is None else decoder(z)
    return image.astype(jnp.float32)


# --------------------------------------------------------------------------- the student


def student(nets: Networks, base: PyTree, adapters: StudentAdapters | None, lr: jax.Array,
            default: Prompts | Conditioning, noise: jax.Array | None = None, *,
            encoder: Callable[[jax.Array], Moments] | None = None,
            tiles: Callable[[Callable, jax.Array], jax.Array] | None = None,
            layout: PatchLayout | None = None) -> tuple[jax.Array, jax.Array]:
    """The one-step student: ``(z_L, ẑ_H)`` for LR images (B, H, W, 3) in [−1, 1], upsampled
    to the output size.

    ``base`` is ``{'transformer': …, 'vae': …}``; ``adapters=None`` when the LoRA is merged into
    it. ``default`` is the unbatched default prompt, or (LoRA merged) its conditioning at
    :data:`STUDENT_TIMESTEP`. ``noise`` draws the posterior sample
    (``None``: its mean). For large images, ``encoder`` replaces the VAE encoder and
    ``tiles(fn, z_L)`` runs the transformer's ``fn`` over tiles of ``z_L``; untiled, ``layout``
    places latents of several sizes in the batch."""
    vae = {"params": base["vae"]}
    transformer_adapter = None
    if adapters is not None:
        vae["lora"] = adapters.vae
        transformer_adapter = adapters.transformer
    z_l = encode(nets, vae, lr, noise, encoder)

    def v_of(z: jax.Array) -> jax.Array:
        n = z.shape[0]
        prompts = default if isinstance(default, Conditioning) else default.batched(n)
        return velocity(nets, base["transformer"], transformer_adapter, z,
                        jnp.full((n,), STUDENT_TIMESTEP), prompts,
                        layout if tiles is None else None)

    v = v_of(z_l) if tiles is None else tiles(v_of, z_l)
    return z_l, z_l - STUDENT_SIGMA * v
