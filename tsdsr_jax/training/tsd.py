"""TSD-SR's training objective (SPEC §4) as pure functions of params, adapters and noise.

One step draws all its randomness up front (:func:`sample_noise`), so that the losses are plain
functions that tests can feed with the very noise a PyTorch reference used. The networks share
one frozen base: the student, the teacher and the fake score differ only in their ``lora``
collection (:class:`Adapters`).

- :func:`student_loss`: one-step student (VAE-encoder LoRA + transformer LoRA at t = 1000), the
  TSD target from the DASM loop under classifier-free guidance, and the data loss
  (LPIPS + latent MSE); differentiable w.r.t. the student's adapters.
- :func:`fake_score_loss`: the online fake-score ("reg") model's flow-matching loss on the
  student's (stop-gradient) latents; differentiable w.r.t. the fake-score adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.diffusion import schedule
from tsdsr_jax.checks import in_range, one_of
from tsdsr_jax.models.mmdit import MMDiT
from tsdsr_jax.models.vae import AutoencoderKL

PyTree = Any
LPIPSFn = Callable[[jax.Array, jax.Array], jax.Array]  # images in [0, 1] -> (B,) distances


@dataclasses.dataclass(frozen=True)
class TSDConfig:
    """The constants of SPEC §4 (the official defaults; the paper's DASM uses 4 steps)."""

    guidance_scale: float = 7.5
    dasm_steps: int = 4                     # N; 1 = without DASM (the released script)
    dasm_step_size: int = 50
    dasm_weights: tuple[float, ...] = (1.0, 0.3, 0.3, 0.3)
    random_bias: bool = True                # b ~ U{−25, …, 24} added to the DASM span
    index_low: int = 50                     # teacher / fake-score indices ~ U{low, …, high − 1}
    index_high: int = 950
    lambda_vsd: float = 0.7                 # grad = λ grad_vsd + (1 − λ) grad_tsm
    lpips_weight: float = 1.0
    mse_weight: float = 1.0
    weighting_scheme: str = "logit_normal"  # logit_normal | sigma_sqrt | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        in_range(self, "guidance_scale", low=0)
        in_range(self, "dasm_steps", low=1)
        if len(self.dasm_weights) < self.dasm_steps:
            raise ValueError(f"dasm_steps={self.dasm_steps}: needs as many dasm_weights, got "
                             f"{len(self.dasm_weights)} {tuple(self.dasm_weights)}")
        in_range(self, "dasm_step_size", low=1)
        in_range(self, "index_low", low=0)
        in_range(self, "index_high", high=schedule.NUM_TRAIN_TIMESTEPS, above=self.index_low)
        in_range(self, "lambda_vsd", 0, 1)
        in_range(self, "lpips_weight", low=0)
        in_range(self, "mse_weight", low=0)
        one_of(self, "weighting_scheme", ("logit_normal", "sigma_sqrt", "mode"))
        in_range(self, "logit_std", above=0)


@dataclasses.dataclass(frozen=True)
class Networks:
    """The (static) modules and the latent scaling; params are passed separately."""

    mmdit: MMDiT
    vae: AutoencoderKL
    scaling_factor: float


class Adapters(NamedTuple):
    """The LoRA collections: the student's (transformer and VAE encoder), teacher, fake score."""

    student: PyTree
    student_vae: PyTree
    teacher: PyTree | None  # None: the plain SD3 teacher
    fake_score: PyTree


class Noise(NamedTuple):
    """Every random draw of one training step."""

    posterior: jax.Array      # (B, h, w, C) ε of the student's VAE posterior sample
    teacher_index: jax.Array  # (B,) int
    bias: jax.Array           # () int, the DASM random bias
    teacher_noise: jax.Array  # (B, h, w, C)
    fake_index: jax.Array     # (B,) int
    fake_noise: jax.Array     # (B, h, w, C)
    u: jax.Array              # (B,) the fake-score loss weighting's draw


class Prompts(NamedTuple):
    """Prompt embeddings, each batched: ``embeds`` (B, L, D), ``pooled`` (B, P)."""

    embeds: jax.Array
    pooled: jax.Array


def sample_noise(rng: jax.Array, latent_shape: tuple[int, ...], config: TSDConfig) -> Noise:
    """Draws one step's randomness."""
    k = jax.random.split(rng, 7)
    b = latent_shape[0]
    half = config.dasm_step_size // 2
    bias = (jax.random.randint(k[2], (), -half, half) if config.random_bias
            else jnp.zeros((), jnp.int32))
    u = (jax.random.uniform(k[6], (b,)) if config.weighting_scheme == "mode"
         else config.logit_mean + config.logit_std * jax.random.normal(k[6], (b,)))
    return Noise(
        posterior=jax.random.normal(k[0], latent_shape),
        teacher_index=jax.random.randint(k[1], (b,), config.index_low, config.index_high),
        bias=bias,
        teacher_noise=jax.random.normal(k[3], latent_shape),
        fake_index=jax.random.randint(k[4], (b,), config.index_low, config.index_high),
        fake_noise=jax.random.normal(k[5], latent_shape),
        u=u)


def dasm_indices(teacher_index: jax.Array, bias: jax.Array, config: TSDConfig) -> jax.Array:
    """(B, N+1) schedule indices of the DASM trajectory of each sample:
    ``linspace(i, min(i + step·N + b, 999), N+1)`` truncated, with torch.linspace's float32
    arithmetic (so the truncation lands where the official code's does)."""
    n = config.dasm_steps
    last = schedule.NUM_TRAIN_TIMESTEPS - 1
    start = teacher_index.astype(jnp.float32)
    end = jnp.minimum(teacher_index + config.dasm_step_size * n + bias, last).astype(jnp.float32)
    step = (end - start) / jnp.float32(n)
    k = jnp.arange(n + 1, dtype=jnp.float32)
    from_start = start[:, None] + step[:, None] * k
    from_end = end[:, None] - step[:, None] * (jnp.float32(n) - k)
    return jnp.where(k < (n + 1) // 2, from_start, from_end).astype(jnp.int32)


# --------------------------------------------------------------------------- the networks

_SIGMAS = schedule.sigmas()
_TIMESTEPS = schedule.timesteps()


def _per_sample(v: jax.Array) -> jax.Array:
    return v[:, None, None, None]


def _interleave(*parts: jax.Array) -> jax.Array:
    """Arrays (B, ...) as one batch (B·k, ...) with row ``i·k + j`` = ``parts[j][i]``: each
    sample's rows stay together, so a batch split over devices needs no data moved."""
    return jnp.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])


def _deinterleave(x: jax.Array, k: int) -> list[jax.Array]:
    """The ``k`` parts of a batch made by :func:`_interleave`."""
    x = x.reshape(-1, k, *x.shape[1:])
    return [x[:, j] for j in range(k)]


def velocity(nets: Networks, base: PyTree, adapter: PyTree | None, x: jax.Array,
             timestep: jax.Array, prompts: Prompts) -> jax.Array:
    """The transformer's prediction ``v ≈ ε − x_0`` with one adapter (or none), float32."""
    variables = {"params": base} if adapter is None else {"params": base, "lora": adapter}
    dtype = nets.mmdit.config.dtype
    out = nets.mmdit.apply(variables, x.astype(dtype), timestep,
                           prompts.embeds.astype(dtype), prompts.pooled.astype(dtype))
    return out.astype(jnp.float32)


def guided_velocity(nets: Networks, base: PyTree, adapter: PyTree | None, x: jax.Array,
                    timestep: jax.Array, cond: Prompts, null: Prompts, scale: float
                    ) -> jax.Array:
    """Classifier-free guidance in one batched call: ``v_∅ + s (v_c − v_∅)``."""
    both = Prompts(_interleave(null.embeds, cond.embeds), _interleave(null.pooled, cond.pooled))
    v = velocity(nets, base, adapter, _interleave(x, x), _interleave(timestep, timestep), both)
    v_null, v_cond = _deinterleave(v, 2)
    return v_null + scale * (v_cond - v_null)


def student(nets: Networks, base: PyTree, adapters: Adapters, lr: jax.Array,
            posterior_noise: jax.Array, default: Prompts) -> tuple[jax.Array, jax.Array]:
    """The one-step student: ``(z_L, ẑ_H)`` for LR images (B, H, W, 3) in [−1, 1]."""
    mean, logvar = nets.vae.apply({"params": base["vae"], "lora": adapters.student_vae},
                                  lr.astype(nets.vae.config.dtype), method="encode")
    z = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * posterior_noise
    z_l = z * nets.scaling_factor
    t = jnp.full((lr.shape[0],), _TIMESTEPS[0])
    v = velocity(nets, base["transformer"], adapters.student, z_l, t, default)
    return z_l, z_l - _SIGMAS[0] * v


# --------------------------------------------------------------------------- the losses


def tsd_gradient(nets: Networks, base: PyTree, adapters: Adapters, z_hat: jax.Array,
                 z_hr: jax.Array, noise: Noise, prompts: Prompts, null: Prompts,
                 config: TSDConfig) -> tuple[jax.Array, jax.Array]:
    """``(grad_vsd, grad_tsm)`` of the DASM loop (no gradient flows through it).

    Both latents are noised to each sample's own teacher σ (the official code's batch flaw, one
    index for all samples, is fixed), then walked N Euler steps down the trajectory: ``ẑ`` with
    the fake score, ``z`` with the teacher, all predictions under CFG."""
    z_hat, z_hr = jax.lax.stop_gradient((z_hat, z_hr))
    indices = dasm_indices(noise.teacher_index, noise.bias, config)
    sigmas = jnp.asarray(_SIGMAS)[indices]          # (B, N+1)
    timesteps = jnp.asarray(_TIMESTEPS)[indices]
    sigma0 = _per_sample(sigmas[:, 0])
    x_hat = sigma0 * noise.teacher_noise + (1 - sigma0) * z_hat
    x = sigma0 * noise.teacher_noise + (1 - sigma0) * z_hr
    transformer = base["transformer"]

    def sub_step(carry, k):
        x_hat, x, grad_vsd, grad_tsm = carry
        s_cur, s_next = _per_sample(sigmas[:, k]), _per_sample(sigmas[:, k + 1])
        t = timesteps[:, k]
        pair = Prompts(_interleave(prompts.embeds, prompts.embeds),
                       _interleave(prompts.pooled, prompts.pooled))
        pair_null = Prompts(_interleave(null.embeds, null.embeds),
                            _interleave(null.pooled, null.pooled))
        v_teacher = guided_velocity(nets, transformer, adapters.teacher, _interleave(x_hat, x),
                                    _interleave(t, t), pair, pair_null, config.guidance_scale)
        v_tea_hat, v_tea = _deinterleave(v_teacher, 2)
        v_fake = guided_velocity(nets, transformer, adapters.fake_score, x_hat, t, prompts,
                                 null, config.guidance_scale)
        weight = jnp.asarray(config.dasm_weights, jnp.float32)[k]
        grad_vsd = jnp.nan_to_num(grad_vsd + (v_tea_hat - v_fake) * s_cur ** 2 * weight)
        grad_tsm = jnp.nan_to_num(grad_tsm + (v_tea_hat - v_tea) * s_cur ** 2 * weight)
        x_hat = x_hat - (s_cur - s_next) * v_fake
        x = x - (s_cur - s_next) * v_tea
        return (x_hat, x, grad_vsd, grad_tsm), None

    zeros = jnp.zeros_like(z_hat)
    (_, _, grad_vsd, grad_tsm), _ = jax.lax.scan(
        sub_step, (x_hat, x, zeros, zeros), jnp.arange(config.dasm_steps))
    return jax.lax.stop_gradient((grad_vsd, grad_tsm))


def student_loss(student_adapters: tuple[PyTree, PyTree], nets: Networks, base: PyTree,
                 adapters: Adapters, batch: dict[str, jax.Array], noise: Noise,
                 default: Prompts, null: Prompts, lpips: LPIPSFn, config: TSDConfig
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The student's loss ``data + L_tsd``; differentiate w.r.t. ``student_adapters`` =
    ``(transformer adapter, VAE-encoder adapter)``. Returns the loss and its parts, with
    ``z_hat`` (the student's ẑ_H) for the fake-score step."""
    adapters = adapters._replace(student=student_adapters[0], student_vae=student_adapters[1])
    prompts = Prompts(batch["prompt_embeds"], batch["pooled_prompt_embeds"])
    _, z_hat = student(nets, base, adapters, batch["lr"], noise.posterior, default)
    z_hr = batch["latent_hr"].astype(jnp.float32)
    grad_vsd, grad_tsm = tsd_gradient(nets, base, adapters, z_hat, z_hr, noise, prompts, null,
                                      config)
    grad = config.lambda_vsd * grad_vsd + (1 - config.lambda_vsd) * grad_tsm
    tsd = 0.5 * jnp.mean(jnp.square(z_hat - jax.lax.stop_gradient(z_hat - grad)))
    image = nets.vae.apply({"params": base["vae"]},
                           (z_hat / nets.scaling_factor).astype(nets.vae.config.dtype),
                           method="decode")
    image = jnp.clip(image.astype(jnp.float32), -1, 1) * 0.5 + 0.5
    lpips_loss = jnp.mean(lpips(image, batch["hr"].astype(jnp.float32) * 0.5 + 0.5))
    mse = jnp.mean(jnp.square(z_hat - z_hr))
    data = config.lpips_weight * lpips_loss + config.mse_weight * mse
    parts = {"tsd_loss": tsd, "lpips_loss": lpips_loss, "mse_loss": mse, "data_loss": data,
             "grad_vsd": grad_vsd, "grad_tsm": grad_tsm, "z_hat": z_hat, "image": image}
    return data + tsd, parts


def loss_weighting(noise: Noise, sigma: jax.Array, config: TSDConfig) -> jax.Array:
    """The fake-score loss weighting per sample (the official three schemes)."""
    if config.weighting_scheme == "sigma_sqrt":
        return sigma ** -2.0
    if config.weighting_scheme == "logit_normal":
        return jax.nn.sigmoid(noise.u)
    u = noise.u
    return 1 - u - config.mode_scale * (jnp.cos(np.pi * u / 2) ** 2 - 1 + u)


def fake_score_loss(fake_adapter: PyTree, nets: Networks, base: PyTree, z_hat: jax.Array,
                    batch: dict[str, jax.Array], noise: Noise, config: TSDConfig
                    ) -> jax.Array:
    """``L_reg = ½ · mean(w) · mean((x̂_0 − ẑ_H)²)`` (the official reduction) on the student's
    stop-gradient latents noised to each sample's σ; differentiate w.r.t. ``fake_adapter``."""
    z_hat = jax.lax.stop_gradient(z_hat.astype(jnp.float32))
    sigma = jnp.asarray(_SIGMAS)[noise.fake_index]
    t = jnp.asarray(_TIMESTEPS)[noise.fake_index]
    x = _per_sample(sigma) * noise.fake_noise + (1 - _per_sample(sigma)) * z_hat
    prompts = Prompts(batch["prompt_embeds"], batch["pooled_prompt_embeds"])
    v = velocity(nets, base["transformer"], fake_adapter, x, t, prompts)
    x0 = x - _per_sample(sigma) * v
    weighting = loss_weighting(noise, sigma, config)
    return jnp.nan_to_num(0.5 * jnp.mean(weighting) * jnp.mean(jnp.square(x0 - z_hat)))
