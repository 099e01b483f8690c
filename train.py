"""TSD-SR training: ``python train.py --config configs/tsd.py [--config.key=value ...]``.

Sections: config → model and frozen base → data → state (new or resumed) → the jitted step →
the loop (logs, validation images, checkpoints). Only LoRA adapters train; see tsdsr_jax/tsd.py
for the objective and tsdsr_jax/trainer.py for the step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from ml_collections import config_flags
from tqdm import tqdm

from tsdsr_jax import model_dir, trainer, tsd
from tsdsr_jax.adapters import STUDENT_TARGETS, vae_encoder_targets
from tsdsr_jax.checkpoint import Checkpoints
from tsdsr_jax.data.layout import DataError
from tsdsr_jax.images import save_png
from tsdsr_jax.models import lora
from tsdsr_jax.models import lpips as lpips_model
from tsdsr_jax.models.mmdit import MMDiT
from tsdsr_jax.models.vae import AutoencoderKL
from tsdsr_jax.pipeline import PRECISIONS, to_uint8

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)


class ConfigError(ValueError):
    """A run that cannot start; said before anything compiles."""


# --------------------------------------------------------------------------- model


def load_model(config: ml_collections.ConfigDict) -> tuple[model_dir.Model, object]:
    """The model directory (or the tiny model) and its LPIPS params, checked for training."""
    if config.model == "tiny":
        model = model_dir.tiny()
        model.embeddings["null"] = {k: jnp.zeros_like(v)
                                    for k, v in model.embeddings["default"].items()}
        return model, lpips_model.init_params(jax.random.key(config.seed), "alex")
    model = model_dir.load(config.model)
    missing = [what for what, ok in (
        ("the default-prompt embeddings (--embeddings)", "default" in model.embeddings),
        ("the null-prompt embeddings (--null-embeddings)", "null" in model.embeddings),
    ) if not ok]
    if missing:
        raise ConfigError(f"{config.model} lacks " + " and ".join(missing)
                          + ": convert again with them")
    if config.teacher == "lora" and "teacher" not in model.adapters:
        raise ConfigError(f"{config.model} has no teacher LoRA (convert with --teacher-lora, "
                          "or set --config.teacher=sd3 to let the plain SD3 model teach)")
    try:
        lpips_params = model_dir.load_lpips(config.model)[1]
    except model_dir.ModelDirError as e:
        raise ConfigError(f"{e} (convert with --lpips-backbone alexnet-….pth)") from None
    return model, lpips_params


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
    from tsdsr_jax.data.degrade import DegradeConfig
    from tsdsr_jax.data.pipeline import DataConfig, train_batches
    from tsdsr_jax.data.source import SampleSpec

    t, v = model.transformer_config, model.vae_config
    prompt_len = model.embeddings["default"]["prompt_embeds"].shape[0]
    spec = SampleSpec(resolution=config.data.resolution,
                      prompt_shape=(prompt_len, t.joint_attention_dim),
                      pooled_dim=t.pooled_projection_dim, latent_channels=v.latent_channels,
                      vae_factor=2 ** (len(v.block_out_channels) - 1))
    data = DataConfig(roots=tuple(config.data.roots), batch_size=config.batch_size,
                      seed=config.seed,
                      degradation=DegradeConfig() if config.data.degrade else None,
                      spec=spec, skip_invalid=config.data.skip_invalid,
                      num_workers=config.data.num_workers)
    return iter(train_batches(data))


# --------------------------------------------------------------------------- logging


class Logger:
    """Scalars to ``workdir/metrics.jsonl`` and TensorBoard (when tensorboardX is installed)."""

    def __init__(self, workdir: Path):
        self.file = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)


def validation_image(nets: tsd.Networks, frozen: trainer.Frozen, state: trainer.TrainState,
                     batch: dict[str, np.ndarray]) -> np.ndarray:
    """LR | SR | HR for the first sample of a batch (the student with its posterior mean)."""
    lr = jnp.asarray(batch["lr"][:1])
    vae_config = nets.vae.config
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    no_noise = jnp.zeros((1, lr.shape[1] // factor, lr.shape[2] // factor,
                          vae_config.latent_channels))
    adapters = tsd.Adapters(*state.student, frozen.teacher, state.fake_score)
    default = tsd.Prompts(frozen.default.embeds[None], frozen.default.pooled[None])
    _, z_hat = tsd.student(nets, frozen.base, adapters, lr, no_noise, default)
    sr = nets.vae.apply({"params": frozen.base["vae"]}, z_hat / nets.scaling_factor,
                        method="decode")
    row = [np.asarray(lr[0]), np.asarray(jnp.clip(sr[0], -1, 1)), batch["hr"][0]]
    return to_uint8(np.concatenate(row, axis=1) * 0.5 + 0.5)


# --------------------------------------------------------------------------- main


def train(config: ml_collections.ConfigDict) -> None:
    if config.teacher not in ("lora", "sd3"):
        raise ConfigError(f"teacher={config.teacher!r}: 'lora' or 'sd3'")
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    model, lpips_params = load_model(config)
    nets = networks(model, config)
    dtype = PRECISIONS[config.precision]
    emb = {k: tsd.Prompts(v["prompt_embeds"], v["pooled_prompt_embeds"])
           for k, v in model.embeddings.items()}
    frozen = trainer.Frozen(
        base=jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.params),
        teacher=model.adapters["teacher"] if config.teacher == "lora" else None,
        default=emb["default"], null=emb["null"],
        lpips=jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), lpips_params))
    tsd_config = tsd.TSDConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                  for k, v in config.tsd.items()})
    opt_student = trainer.optimizer(trainer.OptimConfig(**config.optim_student))
    opt_fake = trainer.optimizer(trainer.OptimConfig(**config.optim_fake_score))
    batches = data_iterator(config, model)

    rng = jax.random.PRNGKey(config.seed)
    state = trainer.init_state(rng, model.params, initial_student(model, config, rng),
                               config.fake_score_rank, opt_student, opt_fake)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        state, data_state = checkpoints.restore(state)
        batches.set_state(data_state)
        print(f"resumed from step {int(state.step)}")

    step_fn = jax.jit(lambda s, f, b: trainer.train_step(s, f, b, nets, tsd_config, opt_student,
                                                          opt_fake), donate_argnums=0)
    logger = Logger(workdir)
    start = int(state.step)
    with tqdm(total=config.total_steps, initial=start, unit="step") as bar:
        for step in range(start + 1, config.total_steps + 1):
            batch = next(batches)
            tic = time.perf_counter()
            state, metrics = step_fn(state, frozen, batch)
            if step % config.log_every == 0 or step == config.total_steps:
                scalars = {k: float(v) for k, v in metrics.items()}
                scalars["step_time_s"] = time.perf_counter() - tic
                logger.write(step, scalars)
                bar.set_postfix_str(f"loss {scalars['loss']:.4f} reg {scalars['reg_loss']:.4f}")
            if step % config.validate_every == 0:
                save_png(validation_image(nets, frozen, state, batch),
                         workdir / "validation" / f"step_{step:07d}.png")
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                checkpoints.save(step, state, batches.get_state())
            bar.update(1)
    checkpoints.close()


def main(argv: list[str]) -> None:
    del argv
    try:
        train(_CONFIG.value)
    except (ConfigError, model_dir.ModelDirError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
