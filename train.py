"""Training: ``python train.py --config configs/tsd.py [--config.key=value ...]``.

Two stages share this script: ``tsd`` (the one-step student, configs/tsd.py) and ``teacher``
(the teacher LoRA on SD3's flow-matching loss, configs/teacher.py). Sections: model and frozen
base → the stage (state, step, validation) → data → state (new or resumed) → the loop (logs,
validation images, checkpoints). Only LoRA adapters train; see tsdsr_jax/tsd.py and
tsdsr_jax/teacher.py for the objectives and tsdsr_jax/trainer.py for the steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from tsdsr_jax import model_dir, schedule, sharding, teacher, trainer, tsd
from tsdsr_jax.adapters import STUDENT_TARGETS, vae_encoder_targets
from tsdsr_jax.checkpoint import Checkpoints
from tsdsr_jax.data.layout import DataError
from tsdsr_jax.images import save_png
from tsdsr_jax.models import lora
from tsdsr_jax.models import lpips as lpips_model
from tsdsr_jax.models.mmdit import MMDiT
from tsdsr_jax.models.vae import AutoencoderKL
from tsdsr_jax.pipeline import PRECISIONS, to_uint8
from tsdsr_jax.tree import flatten, nest

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
FLAGS = flags.FLAGS
flags.DEFINE_string("coordinator", None, "multi-process runs: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-process runs: how many processes")
flags.DEFINE_integer("process_id", None, "multi-process runs: this process's index")


class ConfigError(ValueError):
    """A run that cannot start; said before anything compiles."""


# --------------------------------------------------------------------------- model


def load_model(config: ml_collections.ConfigDict) -> model_dir.Model:
    """The model directory (or the tiny model), checked for what the stage reads."""
    if config.model == "tiny":
        model = model_dir.tiny()
        model.embeddings["null"] = {k: jnp.zeros_like(v)
                                    for k, v in model.embeddings["default"].items()}
        return model
    model = model_dir.load(config.model)
    needed = [("the null-prompt embeddings (--null-embeddings)", "null")]
    if config.stage == "tsd":
        needed.insert(0, ("the default-prompt embeddings (--embeddings)", "default"))
    missing = [what for what, key in needed if key not in model.embeddings]
    if missing:
        raise ConfigError(f"{config.model} lacks " + " and ".join(missing)
                          + ": convert again with them")
    return model


def load_lpips(config: ml_collections.ConfigDict) -> object:
    """LPIPS-alex for the TSD stage's data loss (random for the tiny model); None otherwise."""
    if config.stage != "tsd":
        return None
    if config.model == "tiny":
        return lpips_model.init_params(jax.random.key(config.seed), "alex")
    try:
        return model_dir.load_lpips(config.model)[1]
    except model_dir.ModelDirError as e:
        raise ConfigError(f"{e} (convert with --lpips-backbone alexnet-….pth)") from None


def load_teacher(config: ml_collections.ConfigDict, model: model_dir.Model) -> object:
    """The TSD stage's teacher adapter: the model directory's (``lora``), none (``sd3``: plain
    SD3 teaches), or the latest state of a teacher run's checkpoints folder (a path)."""
    if config.stage != "tsd" or config.teacher == "sd3":
        return None
    if config.teacher == "lora":
        if "teacher" not in model.adapters:
            raise ConfigError(f"{config.model} has no teacher LoRA (convert with --teacher-lora, "
                              "or set --config.teacher=sd3 to let the plain SD3 model teach)")
        return model.adapters["teacher"]
    try:
        checkpoints = Checkpoints(config.teacher, create=False)
        try:
            state = checkpoints.restore_raw()
        finally:
            checkpoints.close()
    except FileNotFoundError as e:
        raise ConfigError(f"teacher={config.teacher!r}: {e}; expected 'lora', 'sd3' or a "
                          "teacher run's checkpoints folder") from None
    if "teacher" not in state:
        raise ConfigError(f"{config.teacher}: not a teacher run's checkpoints")
    adapter = flatten(state["teacher"])
    rank = next(v.shape[-1] for k, v in adapter.items() if k.endswith(".lora_A"))
    expected = {}
    for path, (a, b) in lora.adapter_shapes(model.params["transformer"], STUDENT_TARGETS,
                                            rank).items():
        expected |= {f"{path}.lora_A": a, f"{path}.lora_B": b}
    wrong = sorted(k for k in expected.keys() | adapter.keys()
                   if k not in adapter or k not in expected or adapter[k].shape != expected[k])
    if wrong:
        raise ConfigError(f"{config.teacher}: its teacher LoRA does not fit {config.model}: "
                          + ", ".join(wrong[:5]) + (" …" if len(wrong) > 5 else ""))
    return nest({k: jnp.asarray(v) for k, v in adapter.items()})


def networks(model: model_dir.Model, config: ml_collections.ConfigDict) -> tsd.Networks:
    dtype = PRECISIONS[config.precision]
    remat = None if config.remat_policy == "none" else config.remat_policy
    mmdit = MMDiT(dataclasses.replace(model.transformer_config, dtype=dtype, remat_policy=remat,
                                      attention_impl=config.attention_impl))
    vae = AutoencoderKL(dataclasses.replace(model.vae_config, dtype=dtype))
    return tsd.Networks(mmdit, vae, model.vae_config.scaling_factor)


def initial_student(model: model_dir.Model, config: ml_collections.ConfigDict, rng):
    if config.init_student == "model":
        if not {"student", "student_vae"} <= set(model.adapters):
            raise ConfigError(f"init_student='model' but {config.model} has no student LoRA")
        return model.adapters["student"], model.adapters["student_vae"]
    k_t, k_v = jax.random.split(rng)
    base = model.params
    return (lora.init_adapter(k_t, base["transformer"], STUDENT_TARGETS, config.student_rank),
            lora.init_adapter(k_v, base["vae"], vae_encoder_targets(base["vae"]),
                              config.student_vae_rank))


# --------------------------------------------------------------------------- data


def data_iterator(config: ml_collections.ConfigDict, model: model_dir.Model):
    """This process's rows of every global batch (``config.data.shards`` streams, 0: one per
    process; fix it to keep the data order when the number of processes changes)."""
    from tsdsr_jax.data.degrade import DegradeConfig
    from tsdsr_jax.data.pipeline import DataConfig, ProcessBatches
    from tsdsr_jax.data.source import SampleSpec

    t, v = model.transformer_config, model.vae_config
    prompt_len = model.embeddings["null"]["prompt_embeds"].shape[0]
    spec = SampleSpec(resolution=config.data.resolution,
                      prompt_shape=(prompt_len, t.joint_attention_dim),
                      pooled_dim=t.pooled_projection_dim, latent_channels=v.latent_channels,
                      vae_factor=2 ** (len(v.block_out_channels) - 1))
    data = DataConfig(roots=tuple(config.data.roots), batch_size=config.batch_size,
                      seed=config.seed,
                      degradation=DegradeConfig() if config.data.degrade else None,
                      lr=config.stage == "tsd", spec=spec, skip_invalid=config.data.skip_invalid,
                      num_workers=config.data.num_workers)
    shards = config.data.shards or jax.process_count()
    if shards % jax.process_count() or config.batch_size % shards:
        raise ConfigError(f"data.shards={shards} must be a multiple of the {jax.process_count()} "
                          f"processes and divide batch_size={config.batch_size}")
    return ProcessBatches(data, shards)


# --------------------------------------------------------------------------- logging


class Logger:
    """Scalars to ``workdir/metrics.jsonl`` and TensorBoard (when tensorboardX is installed);
    only process 0 writes."""

    def __init__(self, workdir: Path):
        self.file = self.tb = None
        if jax.process_index() != 0:
            return
        self.file = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)


def validation_image(nets: tsd.Networks, state: trainer.TrainState, frozen: trainer.Frozen,
                     batch: dict[str, jax.Array]) -> jax.Array:
    """LR | SR | HR in [0, 1] for the first sample of a batch (the student, posterior mean)."""
    lr = batch["lr"][:1]
    vae_config = nets.vae.config
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    no_noise = jnp.zeros((1, lr.shape[1] // factor, lr.shape[2] // factor,
                          vae_config.latent_channels))
    adapters = tsd.Adapters(*state.student, frozen.teacher, state.fake_score)
    default = tsd.Prompts(frozen.default.embeds[None], frozen.default.pooled[None])
    _, z_hat = tsd.student(nets, frozen.base, adapters, lr, no_noise, default)
    row = [lr[0], jnp.clip(decode(nets, frozen, z_hat)[0], -1, 1), batch["hr"][0]]
    return jnp.concatenate(row, axis=1) * 0.5 + 0.5


def teacher_validation_image(nets: tsd.Networks, state: trainer.TeacherState,
                             frozen: trainer.Frozen, batch: dict[str, jax.Array], *,
                             num_steps: int, guidance_scale: float, strength: float, seed: int
                             ) -> jax.Array:
    """HR | HR noised to ``strength`` | the teacher's denoising of it | the teacher's sample
    from pure noise, for the first sample's caption (in [0, 1]; fixed noise from ``seed``)."""
    latents = (batch["latent_hr"][:1] if "latent_hr" in batch
               else trainer.hr_latents(nets, frozen.base, batch["hr"][:1]))
    noise = jax.random.normal(jax.random.key(seed), latents.shape)
    prompts = tsd.Prompts(batch["prompt_embeds"][:1], batch["pooled_prompt_embeds"][:1])
    null = tsd.Prompts(frozen.null.embeds[None], frozen.null.pooled[None])
    run = functools.partial(teacher.denoise, nets, frozen.base["transformer"], state.teacher,
                            latents, noise, num_steps, prompts=prompts, null=null,
                            guidance_scale=guidance_scale)
    sigma = teacher.img2img_sigmas(num_steps, strength)[0]
    noised = schedule.add_noise(latents, noise, jnp.full((1,), sigma))
    images = [decode(nets, frozen, z) for z in (noised, run(strength=strength),
                                                run(strength=1.0))]
    row = [batch["hr"][0]] + [jnp.clip(x[0], -1, 1) for x in images]
    return jnp.concatenate(row, axis=1) * 0.5 + 0.5


def decode(nets: tsd.Networks, frozen: trainer.Frozen, latents: jax.Array) -> jax.Array:
    """``D(z / s)`` with the frozen decoder, float32."""
    x = nets.vae.apply({"params": frozen.base["vae"]},
                       (latents / nets.scaling_factor).astype(nets.vae.config.dtype),
                       method="decode")
    return x.astype(jnp.float32)


# --------------------------------------------------------------------------- stages


class Stage(NamedTuple):
    """What differs between the TSD-SR stage and the teacher stage: the state, the step, the
    validation image and the scalars the progress bar shows."""

    state: object
    step: Callable          # (state, frozen, batch) -> (state, metrics); jitted by the loop
    validate: Callable      # (state, frozen, batch) -> image in [0, 1]; jitted by the loop
    shown: tuple[str, ...]


def tsd_stage(config: ml_collections.ConfigDict, model: model_dir.Model, nets: tsd.Networks,
              rng: jax.Array) -> Stage:
    tsd_config = tsd.TSDConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                  for k, v in config.tsd.items()})
    opt_student = trainer.optimizer(trainer.OptimConfig(**config.optim_student))
    opt_fake = trainer.optimizer(trainer.OptimConfig(**config.optim_fake_score))
    state = trainer.init_state(rng, model.params, initial_student(model, config, rng),
                               config.fake_score_rank, opt_student, opt_fake)
    step = functools.partial(trainer.train_step, nets=nets, config=tsd_config,
                             opt_student=opt_student, opt_fake=opt_fake)
    return Stage(state, step, functools.partial(validation_image, nets), ("loss", "reg_loss"))


def teacher_stage(config: ml_collections.ConfigDict, model: model_dir.Model, nets: tsd.Networks,
                  rng: jax.Array) -> Stage:
    flow = teacher.FlowMatchingConfig(**config.flow)
    opt = trainer.optimizer(trainer.OptimConfig(**config.optim_teacher))
    if config.init_teacher == "model" and "teacher" not in model.adapters:
        raise ConfigError(f"init_teacher='model' but {config.model} has no teacher LoRA")
    adapter = model.adapters["teacher"] if config.init_teacher == "model" else None
    state = trainer.init_teacher_state(rng, model.params, adapter, config.teacher_rank, opt)
    step = functools.partial(trainer.teacher_step, nets=nets, config=flow, opt=opt)
    sample = config.sample.to_dict()
    validate = functools.partial(teacher_validation_image, nets, seed=config.seed, **sample)
    return Stage(state, step, validate, ("loss",))


# --------------------------------------------------------------------------- main


def train(config: ml_collections.ConfigDict) -> None:
    if config.stage not in ("tsd", "teacher"):
        raise ConfigError(f"stage={config.stage!r}: 'tsd' or 'teacher'")
    workdir = Path(config.workdir)
    try:
        shard_config = sharding.ShardingConfig(**config.sharding)
        mesh = sharding.make_mesh(shard_config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.batch_size % mesh.size:
        raise ConfigError(f"batch_size={config.batch_size} does not split over the mesh's "
                          f"{mesh.size} devices (data={mesh.shape['data']} x "
                          f"fsdp={mesh.shape['fsdp']})")
    if jax.process_index() == 0:
        print(f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
              f"{jax.process_count()} process(es); global batch {config.batch_size}")
    model = load_model(config)
    teacher_adapter = load_teacher(config, model)
    lpips_params = load_lpips(config)
    nets = networks(model, config)
    dtype = PRECISIONS[config.precision]
    cast = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), tree)  # noqa: E731
    emb = {k: tsd.Prompts(v["prompt_embeds"], v["pooled_prompt_embeds"])
           for k, v in model.embeddings.items()}
    frozen = trainer.Frozen(base=cast(model.params), teacher=teacher_adapter,
                            default=emb.get("default"), null=emb["null"],
                            lpips=lpips_params and cast(lpips_params))
    rng = jax.random.PRNGKey(config.seed)
    stage = (tsd_stage if config.stage == "tsd" else teacher_stage)(config, model, nets, rng)
    batches = data_iterator(config, model)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    # ------------------------------------------------------------ on the mesh
    frozen_shardings = sharding.shardings(frozen, mesh, True, shard_config.min_shard_size)
    frozen = sharding.put(frozen, frozen_shardings)
    state_shardings = sharding.shardings(stage.state, mesh, shard_config.adapters == "fsdp",
                                         shard_config.min_shard_size)
    state = sharding.put(jax.device_get(stage.state), state_shardings)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        state, data_state = checkpoints.restore(state)
        batches.set_state(data_state)
        print(f"resumed from step {int(state.step)}")

    replicated = sharding.replicated(mesh)
    step_fn = jax.jit(stage.step, donate_argnums=0,
                      in_shardings=(state_shardings, frozen_shardings,
                                    sharding.batch_sharding(mesh)),
                      out_shardings=(state_shardings, replicated))
    validate = jax.jit(stage.validate, out_shardings=replicated)
    logger = Logger(workdir)
    start = int(state.step)
    first = jax.process_index() == 0
    with sharding.activate(mesh), tqdm(total=config.total_steps, initial=start, unit="step",
                                       disable=not first) as bar:
        for step in range(start + 1, config.total_steps + 1):
            batch = sharding.global_batch(next(batches), mesh)
            tic = time.perf_counter()
            state, metrics = step_fn(state, frozen, batch)
            if step % config.log_every == 0 or step == config.total_steps:
                scalars = {k: float(v) for k, v in metrics.items()}
                scalars["step_time_s"] = time.perf_counter() - tic
                logger.write(step, scalars)
                bar.set_postfix_str(" ".join(f"{k} {scalars[k]:.4f}" for k in stage.shown))
            if step % config.validate_every == 0:
                image = np.asarray(validate(state, frozen, batch))
                if first:
                    save_png(to_uint8(image), workdir / "validation" / f"step_{step:07d}.png")
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                checkpoints.save(step, state, batches.get_state())
            bar.update(1)
    checkpoints.close()


# --------------------------------------------------------------------------- processes


def initialize_distributed() -> None:
    """Joins a multi-process run: from ``--coordinator`` etc., or from SLURM's environment."""
    if not FLAGS.coordinator and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:  # collectives between CPU processes (tests, CPU-only runs) go through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a jax without the option (gloo by default)
        pass
    if FLAGS.coordinator:
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    else:
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    del argv
    initialize_distributed()
    try:
        train(_CONFIG.value)
    except (ConfigError, model_dir.ModelDirError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
