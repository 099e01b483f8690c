"""The train steps: TSD-SR's (the student's and the fake score's AdamW updates) and the teacher
stage's (one LoRA on SD3's flow-matching loss), each on one frozen base.

Only LoRA adapters train (float32 master weights); the SD3 base, the teacher adapter, the
prompt embeddings and LPIPS are a frozen pytree read by every step. A step whose loss or
gradients are not finite leaves that optimiser's weights and state untouched and is counted, as
are the steps whose DASM values were zeroed for being non-finite.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tsdsr_jax.diffusion.denoiser import Networks, Prompts, StudentAdapters, encode
from tsdsr_jax.models import lora
from tsdsr_jax.models.lpips import lpips
from tsdsr_jax.models.targets import FAKE_SCORE_TARGETS, STUDENT_TARGETS
from tsdsr_jax.training import flow_matching, tsd

PyTree = Any


class TrainState(NamedTuple):
    """Everything a run changes; a checkpoint saves exactly this (plus the data position)."""

    step: jax.Array
    student: StudentAdapters
    fake_score: PyTree
    opt_student: optax.OptState
    opt_fake: optax.OptState
    skipped: jax.Array              # (student, fake score) updates skipped as non-finite, and
                                    # the steps whose DASM values were zeroed
    rng: jax.Array                  # a raw uint32 key


class Frozen(NamedTuple):
    """What every step reads and never changes."""

    base: PyTree                    # {'transformer': …, 'vae': …}
    teacher: PyTree | None          # the teacher adapter (None: plain SD3 or the teacher stage)
    default: Prompts                # unbatched (L, D) and (P,)
    null: Prompts
    lpips: PyTree | None            # None in the teacher stage


def init_state(rng: jax.Array, base: PyTree, student: StudentAdapters,
               fake_rank: int, opt_student: optax.GradientTransformation,
               opt_fake: optax.GradientTransformation) -> TrainState:
    """A fresh state: the given student adapters and a new fake-score adapter (peft init)."""
    rng, fake_rng = jax.random.split(rng)
    fake = lora.init_adapter(fake_rng, base["transformer"], FAKE_SCORE_TARGETS, fake_rank)
    student = StudentAdapters(*jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                                                      tuple(student)))
    return TrainState(jnp.zeros((), jnp.int32), student, fake, opt_student.init(student),
                      opt_fake.init(fake), jnp.zeros((3,), jnp.int32), rng)


def _all_finite(*trees: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(trees)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _update(params, grads, opt_state, opt, finite):
    updates, new_state = opt.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    return (jax.tree_util.tree_map(keep, new_params, params),
            jax.tree_util.tree_map(keep, new_state, opt_state))


def hr_latents(nets: Networks, base: PyTree, hr: jax.Array) -> jax.Array:
    """The latents of HR images (posterior mean, frozen VAE), for batches without precomputed
    ones."""
    return jax.lax.stop_gradient(encode(nets, {"params": base["vae"]}, hr))


def train_step(state: TrainState, frozen: Frozen, batch: dict[str, jax.Array],
               nets: Networks, config: tsd.TSDConfig, opt_student: optax.GradientTransformation,
               opt_fake: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step: the student's update, then the fake score's on the same ẑ_H (jit with
    ``nets``, ``config`` and the optimisers static)."""
    b = batch["lr"].shape[0]
    if "latent_hr" not in batch:
        batch = {**batch, "latent_hr": hr_latents(nets, frozen.base, batch["hr"])}
    rng, step_rng = jax.random.split(state.rng)
    noise = tsd.sample_noise(step_rng, batch["latent_hr"].shape, config)
    adapters = tsd.Adapters(state.student, frozen.teacher, state.fake_score)
    lpips_fn = lambda x, y: lpips(frozen.lpips, x, y)  # noqa: E731
    (loss, parts), grads = jax.value_and_grad(tsd.student_loss, has_aux=True)(
        state.student, nets, frozen.base, adapters, batch, noise, frozen.default,
        frozen.null.batched(b), lpips_fn, config)
    reg_loss, fake_grads = jax.value_and_grad(tsd.fake_score_loss)(
        state.fake_score, nets, frozen.base, parts["z_hat"], batch, noise, config)
    ok_student = _all_finite(loss, grads)
    ok_fake = _all_finite(reg_loss, fake_grads)
    student, opt_student_state = _update(state.student, grads, state.opt_student, opt_student,
                                         ok_student)
    fake, opt_fake_state = _update(state.fake_score, fake_grads, state.opt_fake, opt_fake,
                                   ok_fake)
    skipped = state.skipped + jnp.stack([~ok_student, ~ok_fake,
                                         parts["dasm_zeroed"]]).astype(jnp.int32)
    metrics = {"loss": loss, "reg_loss": reg_loss,
               **{k: parts[k] for k in ("tsd_loss", "lpips_loss", "mse_loss", "data_loss")},
               "grad_norm": optax.tree.norm(grads), "reg_grad_norm": optax.tree.norm(fake_grads),
               "skipped_student": skipped[0], "skipped_fake": skipped[1],
               "zeroed_dasm": skipped[2]}
    new_state = TrainState(state.step + 1, student, fake, opt_student_state, opt_fake_state,
                           skipped, rng)
    return new_state, metrics


# --------------------------------------------------------------------------- the teacher stage


class TeacherState(NamedTuple):
    """The teacher stage's state: one adapter and its optimiser."""

    step: jax.Array
    teacher: PyTree
    opt_teacher: optax.OptState
    skipped: jax.Array              # () updates skipped as non-finite
    rng: jax.Array


def init_teacher_state(rng: jax.Array, base: PyTree, adapter: PyTree | None, rank: int,
                       opt: optax.GradientTransformation) -> TeacherState:
    """A fresh state from ``adapter`` (to fine-tune further) or a new one at the student's
    targets (peft init)."""
    rng, init_rng = jax.random.split(rng)
    if adapter is None:
        adapter = lora.init_adapter(init_rng, base["transformer"], STUDENT_TARGETS, rank)
    adapter = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), adapter)
    return TeacherState(jnp.zeros((), jnp.int32), adapter, opt.init(adapter),
                        jnp.zeros((), jnp.int32), rng)


def teacher_step(state: TeacherState, frozen: Frozen, batch: dict[str, jax.Array],
                 nets: Networks, config: flow_matching.FlowMatchingConfig,
                 opt: optax.GradientTransformation) -> tuple[TeacherState, dict[str, jax.Array]]:
    """One flow-matching step on the HR latents and captions of a batch (jit with ``nets``,
    ``config`` and ``opt`` static)."""
    latents = batch["latent_hr"] if "latent_hr" in batch else hr_latents(nets, frozen.base,
                                                                          batch["hr"])
    rng, step_rng = jax.random.split(state.rng)
    noise = flow_matching.sample_noise(step_rng, latents.shape, config)
    prompts = Prompts(batch["prompt_embeds"], batch["pooled_prompt_embeds"])
    (loss, aux), grads = jax.value_and_grad(flow_matching.flow_matching_loss, has_aux=True)(
        state.teacher, nets, frozen.base["transformer"], latents, prompts,
        frozen.null.batched(latents.shape[0]), noise, config)
    ok = _all_finite(loss, grads)
    adapter, opt_state = _update(state.teacher, grads, state.opt_teacher, opt, ok)
    skipped = state.skipped + (~ok).astype(jnp.int32)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "sigma_mean":
               jnp.mean(aux["sigma"]), "skipped": skipped}
    return TeacherState(state.step + 1, adapter, opt_state, skipped, rng), metrics
