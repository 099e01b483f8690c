"""TSD-SR's training objective (paper §3) as pure functions of params, adapters and noise.

One step draws all its randomness up front (:func:`sample_noise`), so that the losses are plain
functions that tests can feed with the very noise a PyTorch reference used. The networks share
one frozen base: the student, the teacher and the fake score differ only in their ``lora``
collection (:class:`Adapters`); the networks' calls are :mod:`tsdsr_jax.diffusion.denoiser`'s.

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

from tsdsr_jax.checks import in_range, one_of
from tsdsr_jax.diffusion import schedule
from tsdsr_jax.diffusion.denoiser import (
    Networks,
    Prompts,
    StudentAdapters,
    decode,
    deinterleave,
    guided_velocity,
    interleave,
    student,
    velocity,
)

PyTree = Any
LPIPSFn = Callable[[jax.Array, jax.Array], jax.Array]  # images in [0, 1] -> (B,) distances


@dataclasses.dataclass(frozen=True)
class TSDConfig:
    """The official training defaults (the paper's DASM, §3.3, uses 4 steps)."""

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


class Adapters(NamedTuple):
    """The LoRA collections: the student's, the teacher's and the fake score's."""

    student: StudentAdapters
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


# --------------------------------------------------------------------------- the losses

_SIGMAS = schedule.sigmas()
_TIMESTEPS = schedule.timesteps()


def tsd_gradient(nets: Networks, base: PyTree, adapters: Adapters, z_hat: jax.Array,
                 z_hr: jax.Array, noise: Noise, prompts: Prompts, null: Prompts,
                 config: TSDConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(grad_vsd, grad_tsm, zeroed)`` of the DASM loop (no gradient flows through it);
    ``zeroed`` is whether any non-finite value was set to 0 (as the official code does).

    Both latents are noised to each sample's own teacher σ (the official code's batch flaw, one
    index for all samples, is fixed), then walked N Euler steps down the trajectory: ``ẑ`` with
    the fake score, ``z`` with the teacher, all predictions under CFG."""
    z_hat, z_hr = jax.lax.stop_gradient((z_hat, z_hr))
    indices = dasm_indices(noise.teacher_index, noise.bias, config)
    sigmas = jnp.asarray(_SIGMAS)[indices]          # (B, N+1)
    timesteps = jnp.asarray(_TIMESTEPS)[indices]
    x_hat = schedule.add_noise(z_hat, noise.teacher_noise, sigmas[:, 0])
    x = schedule.add_noise(z_hr, noise.teacher_noise, sigmas[:, 0])
    transformer = base["transformer"]
    pair = Prompts(interleave(prompts.embeds, prompts.embeds),
                   interleave(prompts.pooled, prompts.pooled))
    pair_null = Prompts(interleave(null.embeds, null.embeds), interleave(null.pooled, null.pooled))

    def sub_step(carry, k):
        x_hat, x, grad_vsd, grad_tsm, zeroed = carry
        s_cur, s_next = sigmas[:, k], sigmas[:, k + 1]
        t = timesteps[:, k]
        v_teacher = guided_velocity(nets, transformer, adapters.teacher, interleave(x_hat, x),
                                    interleave(t, t), pair, pair_null, config.guidance_scale)
        v_tea_hat, v_tea = deinterleave(v_teacher, 2)
        v_fake = guided_velocity(nets, transformer, adapters.fake_score, x_hat, t, prompts,
                                 null, config.guidance_scale)
        weight = jnp.asarray(config.dasm_weights, jnp.float32)[k]
        s2 = s_cur[:, None, None, None] ** 2
        grad_vsd = grad_vsd + (v_tea_hat - v_fake) * s2 * weight
        grad_tsm = grad_tsm + (v_tea_hat - v_tea) * s2 * weight
        zeroed = zeroed | ~(jnp.all(jnp.isfinite(grad_vsd)) & jnp.all(jnp.isfinite(grad_tsm)))
        grad_vsd, grad_tsm = jnp.nan_to_num(grad_vsd), jnp.nan_to_num(grad_tsm)
        x_hat = schedule.euler_step(x_hat, v_fake, s_cur, s_next)
        x = schedule.euler_step(x, v_tea, s_cur, s_next)
        return (x_hat, x, grad_vsd, grad_tsm, zeroed), None

    zeros = jnp.zeros_like(z_hat)
    (_, _, grad_vsd, grad_tsm, zeroed), _ = jax.lax.scan(
        sub_step, (x_hat, x, zeros, zeros, jnp.zeros((), bool)), jnp.arange(config.dasm_steps))
    return jax.lax.stop_gradient((grad_vsd, grad_tsm)) + (zeroed,)


def student_loss(student_adapters: StudentAdapters, nets: Networks, base: PyTree,
                 adapters: Adapters, batch: dict[str, jax.Array], noise: Noise,
                 default: Prompts, null: Prompts, lpips: LPIPSFn, config: TSDConfig
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The student's loss ``data + L_tsd``; differentiate w.r.t. ``student_adapters``.
    ``default`` is the unbatched default prompt, ``null`` the batched null prompt. Returns the
    loss and its parts, with ``z_hat`` (the student's ẑ_H) for the fake-score step."""
    adapters = adapters._replace(student=student_adapters)
    prompts = Prompts(batch["prompt_embeds"], batch["pooled_prompt_embeds"])
    _, z_hat = student(nets, base, student_adapters, batch["lr"], default, noise.posterior)
    z_hr = batch["latent_hr"].astype(jnp.float32)
    grad_vsd, grad_tsm, zeroed = tsd_gradient(nets, base, adapters, z_hat, z_hr, noise,
                                              prompts, null, config)
    grad = config.lambda_vsd * grad_vsd + (1 - config.lambda_vsd) * grad_tsm
    tsd = 0.5 * jnp.mean(jnp.square(z_hat - jax.lax.stop_gradient(z_hat - grad)))
    image = jnp.clip(decode(nets, {"params": base["vae"]}, z_hat), -1, 1) * 0.5 + 0.5
    lpips_loss = jnp.mean(lpips(image, batch["hr"].astype(jnp.float32) * 0.5 + 0.5))
    mse = jnp.mean(jnp.square(z_hat - z_hr))
    data = config.lpips_weight * lpips_loss + config.mse_weight * mse
    parts = {"tsd_loss": tsd, "lpips_loss": lpips_loss, "mse_loss": mse, "data_loss": data,
             "grad_vsd": grad_vsd, "grad_tsm": grad_tsm, "dasm_zeroed": zeroed, "z_hat": z_hat,
             "image": image}
    return data + tsd, parts


def fake_score_loss(fake_adapter: PyTree, nets: Networks, base: PyTree, z_hat: jax.Array,
                    batch: dict[str, jax.Array], noise: Noise, config: TSDConfig
                    ) -> jax.Array:
    """``L_reg = ½ · mean(w) · mean((x̂_0 − ẑ_H)²)`` (the official reduction) on the student's
    stop-gradient latents noised to each sample's σ; differentiate w.r.t. ``fake_adapter``.
    The weighting ``w`` is σ⁻² for ``sigma_sqrt``, else the timestep density at the draw ``u``,
    as the official code computes it. A non-finite loss is returned as it is (the official code
    zeroes it): the step then skips the fake score's update and counts it."""
    z_hat = jax.lax.stop_gradient(z_hat.astype(jnp.float32))
    sigma = jnp.asarray(_SIGMAS)[noise.fake_index]
    t = jnp.asarray(_TIMESTEPS)[noise.fake_index]
    x = schedule.add_noise(z_hat, noise.fake_noise, sigma)
    prompts = Prompts(batch["prompt_embeds"], batch["pooled_prompt_embeds"])
    x0 = schedule.predict_x0(x, velocity(nets, base["transformer"], fake_adapter, x, t, prompts),
                             sigma)
    if config.weighting_scheme == "sigma_sqrt":
        weighting = sigma ** -2.0
    else:
        weighting = schedule.timestep_density(noise.u, config.weighting_scheme, config.mode_scale)
    return 0.5 * jnp.mean(weighting) * jnp.mean(jnp.square(x0 - z_hat))
