"""The training loop of both stages: the model, frozen inputs and data a config names, then
steps with logs, validation images and checkpoints, resumed from the last checkpoint and
stopped cleanly on preemption. :mod:`tsdsr_jax.training.stages` builds what it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from tsdsr_jax import sharding
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.images import save_image, to_uint8
from tsdsr_jax.io.tree import flatten, nest, shape_problems
from tsdsr_jax.models import lora
from tsdsr_jax.models import lpips as lpips_model
from tsdsr_jax.models.mmdit import runnable_here
from tsdsr_jax.models.targets import STUDENT_TARGETS
from tsdsr_jax.training import run_config, stages
from tsdsr_jax.training.checkpoint import Checkpoints, read_state
from tsdsr_jax.training.preemption import Preemption
from tsdsr_jax.training.run_config import ConfigError

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
        state = read_state(config.teacher)
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
    problems = shape_problems({k: v.shape for k, v in adapter.items()}, expected)
    if problems:
        raise ConfigError(f"{config.teacher}: its teacher LoRA does not fit {config.model}: "
                          + "; ".join(problems[:5]) + (" …" if len(problems) > 5 else ""))
    return nest({k: jnp.asarray(v) for k, v in adapter.items()})


# --------------------------------------------------------------------------- data


def data_iterator(config: ml_collections.ConfigDict, model: model_dir.Model):
    """This process's rows of every global batch (``config.data.shards`` streams, 0: one per
    process; fix it to keep the data order when the number of processes changes)."""
    from tsdsr_jax.data.batches import DataConfig, ProcessBatches
    from tsdsr_jax.data.degrade import DegradeConfig

    spec = stages.sample_spec(config, model)
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


# --------------------------------------------------------------------------- main


def train(config: ml_collections.ConfigDict) -> int | None:
    """Runs (or resumes) the configured stage to ``config.total_steps``; on SIGTERM or SIGINT
    it checkpoints the step it is on and returns that step."""
    run_config.check(config)
    if not runnable_here(config.attention_impl):
        raise ConfigError(f"config.attention_impl='cudnn': needs a GPU (jax runs on "
                          f"{jax.default_backend()} here); use --config.attention_impl=xla")
    workdir = Path(config.workdir)
    shard_config, mesh = stages.make_mesh(config)
    if jax.process_index() == 0:
        print(f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
              f"{jax.process_count()} process(es); global batch {config.batch_size}")
    model = load_model(config)
    frozen = stages.frozen_inputs(config, model, load_teacher(config, model), load_lpips(config))
    stage = stages.make_stage(config, model)
    batches = data_iterator(config, model)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    # ------------------------------------------------------------ on the mesh
    jitted = stages.jit_stage(stage, frozen, mesh, shard_config)
    frozen = sharding.put(frozen, jitted.frozen_shardings)
    state = sharding.put(jax.device_get(stage.state), jitted.state_shardings)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        state, data_state = checkpoints.restore(state)
        batches.set_state(data_state)
        print(f"resumed from step {int(state.step)}")

    step_fn, validate = jitted.step, jitted.validate
    logger = Logger(workdir)
    start = int(state.step)
    first = jax.process_index() == 0
    preempted = None
    with Preemption() as preemption, sharding.activate(mesh), tqdm(
            total=config.total_steps, initial=start, unit="step", disable=not first) as bar:
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
                    save_image(to_uint8(image), workdir / "validation" / f"step_{step:07d}.png")
            stop = preemption.reached(step)
            if stop or step % config.checkpoint_every == 0 or step == config.total_steps:
                checkpoints.save(step, state, batches.get_state())
            bar.update(1)
            if stop:
                preempted = step
                break
    checkpoints.close()
    return preempted
