"""The two training stages as what a run compiles: the networks, the initial state, the step and
the validation image of TSD-SR (``tsd``) and of the teacher LoRA (``teacher``), built from a
config and a model (real or abstract: :mod:`tsdsr_jax.aot` compiles them from shapes alone).

The loop (:mod:`tsdsr_jax.training.loop`) runs them; the objectives are in tsd.py and
flow_matching.py, the steps in steps.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from tsdsr_jax import sharding
from tsdsr_jax.data.source import SampleSpec
from tsdsr_jax.diffusion import sampling, schedule
from tsdsr_jax.diffusion.denoiser import Networks, Prompts, StudentAdapters, decode, student
from tsdsr_jax.io import model_dir
from tsdsr_jax.models import PRECISIONS, lora
from tsdsr_jax.models.mmdit import MMDiT
from tsdsr_jax.models.targets import STUDENT_TARGETS, vae_encoder_targets
from tsdsr_jax.models.vae import AutoencoderKL
from tsdsr_jax.training import flow_matching, optim, steps, tsd
from tsdsr_jax.training.run_config import ConfigError


def networks(model: model_dir.Model, config: ml_collections.ConfigDict) -> Networks:
    """The MMDiT and the VAE in the compute precision, both rematerialised by
    ``config.remat_policy`` and both with ``config.attention_impl``; the VAE recomputes its
    GroupNorms in the backward pass (``VAEConfig.remat_norms``)."""
    dtype = PRECISIONS[config.precision]
    remat = None if config.remat_policy == "none" else config.remat_policy
    mmdit = MMDiT(dataclasses.replace(model.transformer_config, dtype=dtype, remat_policy=remat,
                                      attention_impl=config.attention_impl))
    vae = AutoencoderKL(dataclasses.replace(model.vae_config, remat_policy=remat, remat_norms=True,
                                            dtype=model.vae_config.compute_dtype(dtype),
                                            attention_impl=config.attention_impl))
    return Networks(mmdit, vae)


def initial_student(model: model_dir.Model, config: ml_collections.ConfigDict,
                    rng: jax.Array) -> StudentAdapters:
    """The model's student LoRA (``init_student='model'``), or new adapters (peft init)."""
    if config.init_student == "model":
        if not {"student", "student_vae"} <= set(model.adapters):
            raise ConfigError(f"init_student='model' but {config.model} has no student LoRA")
        return StudentAdapters(model.adapters["student"], model.adapters["student_vae"])
    k_t, k_v = jax.random.split(rng)
    base = model.params
    return StudentAdapters(
        lora.init_adapter(k_t, base["transformer"], STUDENT_TARGETS, config.student_rank),
        lora.init_adapter(k_v, base["vae"], vae_encoder_targets(base["vae"]),
                          config.student_vae_rank))


# --------------------------------------------------------------------------- validation


def student_sr(nets: Networks, state: steps.TrainState, frozen: steps.Frozen, lr: jax.Array
               ) -> jax.Array:
    """The student's SR of LR images in [-1, 1] (the posterior mean), in [-1, 1]."""
    _, z_hat = student(nets, frozen.base, state.student, lr, frozen.default)
    return jnp.clip(decode(nets, {"params": frozen.base["vae"]}, z_hat), -1, 1)


def validation_image(nets: Networks, state: steps.TrainState, frozen: steps.Frozen,
                     batch: dict[str, jax.Array]) -> jax.Array:
    """LR | SR | HR in [0, 1] for the first sample of a batch."""
    lr = batch["lr"][:1]
    row = [lr[0], student_sr(nets, state, frozen, lr)[0], batch["hr"][0]]
    return jnp.concatenate(row, axis=1) * 0.5 + 0.5


def teacher_validation_image(nets: Networks, state: steps.TeacherState,
                             frozen: steps.Frozen, batch: dict[str, jax.Array], *,
                             num_steps: int, guidance_scale: float, strength: float, seed: int
                             ) -> jax.Array:
    """HR | HR noised to ``strength`` | the teacher's denoising of it | the teacher's sample
    from pure noise, for the first sample's caption (in [0, 1]; fixed noise from ``seed``)."""
    latents = (batch["latent_hr"][:1] if "latent_hr" in batch
               else steps.hr_latents(nets, frozen.base, batch["hr"][:1]))
    noise = jax.random.normal(jax.random.key(seed), latents.shape)
    prompts = Prompts(batch["prompt_embeds"][:1], batch["pooled_prompt_embeds"][:1])
    run = functools.partial(sampling.denoise, nets, frozen.base["transformer"], state.teacher,
                            latents, noise, num_steps, prompts=prompts,
                            null=frozen.null.batched(1), guidance_scale=guidance_scale)
    sigma = sampling.img2img_sigmas(num_steps, strength)[0]
    noised = schedule.add_noise(latents, noise, jnp.full((1,), sigma))
    images = [decode(nets, {"params": frozen.base["vae"]}, z)
              for z in (noised, run(strength=strength), run(strength=1.0))]
    row = [batch["hr"][0]] + [jnp.clip(x[0], -1, 1) for x in images]
    return jnp.concatenate(row, axis=1) * 0.5 + 0.5


# --------------------------------------------------------------------------- stages


class Stage(NamedTuple):
    """What differs between the TSD-SR stage and the teacher stage: the state, the step, the
    validation image, the SR of held-out LR images (the TSD stage's) and the scalars the
    progress bar shows."""

    state: object
    step: Callable          # (state, frozen, batch) -> (state, metrics); jitted by the loop
    validate: Callable      # (state, frozen, batch) -> image in [0, 1]; jitted by the loop
    shown: tuple[str, ...]
    restore: Callable | None = None  # (state, frozen, lr) -> SR in [-1, 1]; jitted by the loop


def with_learning_rates(step: Callable, rates: dict[str, optim.OptimConfig],
                        opt_states: Callable) -> Callable:
    """``step`` with the learning rate of each optimiser's next update in its metrics (named as
    ``rates``, in the order of ``opt_states(state)``)."""
    def step_and_rates(state, frozen, batch):
        state, metrics = step(state, frozen, batch)
        return state, metrics | {name: optim.next_learning_rate(rate, opt_state) for
                                 (name, rate), opt_state in zip(rates.items(), opt_states(state))}
    return step_and_rates


def tsd_stage(config: ml_collections.ConfigDict, model: model_dir.Model, nets: Networks,
              rng: jax.Array) -> Stage:
    tsd_config = tsd.TSDConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                  for k, v in config.tsd.items()})
    rates = {"lr_student": optim.for_run(config.optim_student, config.total_steps),
             "lr_fake_score": optim.for_run(config.optim_fake_score, config.total_steps)}
    opt_student, opt_fake = (optim.optimizer(c) for c in rates.values())
    k_student, k_state = jax.random.split(rng)  # one key each: no two adapters start alike
    state = steps.init_state(k_state, model.params, initial_student(model, config, k_student),
                             config.fake_score_rank, opt_student, opt_fake)
    step = with_learning_rates(
        functools.partial(steps.train_step, nets=nets, config=tsd_config,
                          opt_student=opt_student, opt_fake=opt_fake),
        rates, lambda s: (s.opt_student, s.opt_fake))
    return Stage(state, step, functools.partial(validation_image, nets), ("loss", "reg_loss"),
                 functools.partial(student_sr, nets))


def teacher_stage(config: ml_collections.ConfigDict, model: model_dir.Model, nets: Networks,
                  rng: jax.Array) -> Stage:
    flow = flow_matching.FlowMatchingConfig(**config.flow)
    rate = optim.for_run(config.optim_teacher, config.total_steps)
    opt = optim.optimizer(rate)
    if config.init_teacher == "model" and "teacher" not in model.adapters:
        raise ConfigError(f"init_teacher='model' but {config.model} has no teacher LoRA")
    adapter = model.adapters["teacher"] if config.init_teacher == "model" else None
    state = steps.init_teacher_state(rng, model.params, adapter, config.teacher_rank, opt)
    step = with_learning_rates(functools.partial(steps.teacher_step, nets=nets, config=flow,
                                                 opt=opt),
                               {"lr_teacher": rate}, lambda s: (s.opt_teacher,))
    sample = config.sample.to_dict()
    validate = functools.partial(teacher_validation_image, nets, seed=config.seed, **sample)
    return Stage(state, step, validate, ("loss",))


def make_stage(config: ml_collections.ConfigDict, model: model_dir.Model) -> Stage:
    """The configured stage (``config.stage``) on ``model``, from ``config.seed``; the config
    as :func:`tsdsr_jax.training.run_config.check` passes it."""
    build = tsd_stage if config.stage == "tsd" else teacher_stage
    return build(config, model, networks(model, config), jax.random.PRNGKey(config.seed))


def frozen_inputs(config: ml_collections.ConfigDict, model: model_dir.Model,
                  teacher_adapter: object, lpips_params: object) -> steps.Frozen:
    """What every step reads, the base and LPIPS in the compute precision (the VAE in its
    own: :meth:`VAEConfig.compute_dtype`); cast on the host when they are host arrays."""
    dtype = PRECISIONS[config.precision]

    def cast(tree, to=dtype):
        return jax.tree_util.tree_map(lambda a: a.astype(to), tree)

    emb = {k: Prompts(v["prompt_embeds"], v["pooled_prompt_embeds"])
           for k, v in model.embeddings.items()}
    base = {"transformer": cast(model.params["transformer"]),
            "vae": cast(model.params["vae"], model.vae_config.compute_dtype(dtype))}
    return steps.Frozen(base=base, teacher=teacher_adapter,
                          default=emb.get("default"), null=emb["null"],
                          lpips=lpips_params and cast(lpips_params))


def sample_spec(config: ml_collections.ConfigDict, model: model_dir.Model) -> SampleSpec:
    """The shapes of one training sample for this model at ``config.data.resolution``."""
    t, v = model.transformer_config, model.vae_config
    return SampleSpec(resolution=config.data.resolution,
                      prompt_shape=model.embeddings["null"]["prompt_embeds"].shape,
                      pooled_dim=t.pooled_projection_dim, latent_channels=v.latent_channels,
                      vae_factor=v.downscale_factor)


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None
              ) -> tuple[sharding.ShardingConfig, jax.sharding.Mesh]:
    """The ``data x fsdp`` mesh of ``config.sharding`` over ``devices`` (default: all), checked
    against the global batch."""
    try:
        shard_config = sharding.ShardingConfig(**config.sharding)
        mesh = sharding.make_mesh(shard_config, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.batch_size % mesh.size:
        raise ConfigError(f"batch_size={config.batch_size} does not split over the mesh's "
                          f"{mesh.size} devices (data={mesh.shape['data']} x "
                          f"fsdp={mesh.shape['fsdp']})")
    return shard_config, mesh


class Jitted(NamedTuple):
    """A stage's step and validation jitted for a mesh, with the shardings of their inputs."""

    step: Callable          # (state, frozen, batch) -> (state, metrics); the state is donated
    validate: Callable      # (state, frozen, batch) -> image
    restore: Callable | None  # (state, frozen, lr) -> SR, replicated
    state_shardings: object
    frozen_shardings: object


def jit_stage(stage: Stage, frozen: steps.Frozen, mesh: jax.sharding.Mesh,
              shard_config: sharding.ShardingConfig) -> Jitted:
    """The frozen inputs split over ``fsdp``, the state as ``shard_config.adapters`` says, the
    batch over every device; ``frozen`` and ``stage.state`` may be abstract."""
    frozen_shardings = sharding.shardings(frozen, mesh, True, shard_config.min_shard_size)
    state_shardings = sharding.shardings(stage.state, mesh, shard_config.adapters == "fsdp",
                                         shard_config.min_shard_size)
    replicated = sharding.replicated(mesh)
    step = jax.jit(stage.step, donate_argnums=0,
                   in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated))
    validate = jax.jit(stage.validate, out_shardings=replicated)
    restore = stage.restore and jax.jit(
        stage.restore, in_shardings=(state_shardings, frozen_shardings,
                                     sharding.batch_sharding(mesh)), out_shardings=replicated)
    return Jitted(step, validate, restore, state_shardings, frozen_shardings)
