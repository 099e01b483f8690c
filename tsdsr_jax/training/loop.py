"""The training loop of both stages: the model, frozen inputs and data a config names, then
steps with logs, validation images and checkpoints, resumed from the last checkpoint and
stopped cleanly on preemption. :mod:`tsdsr_jax.training.stages` builds what it runs."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from tsdsr_jax import sharding
from tsdsr_jax.data.layout import DataError
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.images import save_image, to_uint8
from tsdsr_jax.io.tree import flatten, nest, shape_problems
from tsdsr_jax.models import lora, set_matmul_precision
from tsdsr_jax.models import lpips as lpips_model
from tsdsr_jax.models.mmdit import attention_here, not_runnable_here, resolve_attention
from tsdsr_jax.models.targets import STUDENT_TARGETS
from tsdsr_jax.training import progress, resume, run_config, stages, validation
from tsdsr_jax.training import workdir as workdir_lib
from tsdsr_jax.training.checkpoint import (
    SPACE_ERRORS,
    Checkpoints,
    CheckpointWriteError,
    read_state,
)
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
    model = model_dir.load(config.model, host=True)  # put onto the mesh later, split
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

SKIPPED = "skipped_samples.txt"  # in the workdir: each skipped sample's name and why


def data_iterator(config: ml_collections.ConfigDict, model: model_dir.Model,
                  workdir: Path | None = None):
    """This process's rows of every global batch (``config.data.shards`` streams, 0: one per
    process; fix it to keep the data order when the number of processes changes); skipped
    samples are named in ``workdir/skipped_samples.txt``, when given."""
    from tsdsr_jax.data.batches import DataConfig, ProcessBatches

    spec = stages.sample_spec(config, model)
    section = run_config.section(config, "data")
    data = DataConfig(roots=tuple(config.data.roots), batch_size=config.batch_size,
                      seed=config.seed,
                      degradation=section.degradation if config.data.degrade else None,
                      lr=config.stage == "tsd", spec=spec, skip_invalid=config.data.skip_invalid,
                      skipped_report=str(workdir / SKIPPED) if workdir else None,
                      num_workers=config.data.num_workers)
    shards = config.data.shards or jax.process_count()
    if shards % jax.process_count() or config.batch_size % shards:
        raise ConfigError(f"data.shards={shards} must be a multiple of the {jax.process_count()} "
                          f"processes and divide batch_size={config.batch_size}")
    return ProcessBatches(data, shards)


def skipped_samples(workdir: Path) -> int:
    """How many distinct samples the run has skipped (named in ``workdir/skipped_samples.txt``)."""
    try:
        lines = (workdir / SKIPPED).read_text().splitlines()
    except FileNotFoundError:
        return 0
    return len({line.partition("\t")[0] for line in lines if line})


# --------------------------------------------------------------------------- logging


class Logger:
    """Scalars to ``workdir/metrics.jsonl`` and TensorBoard (when tensorboardX is installed),
    and validation images; only process 0 writes. The TensorBoard events are written in this
    thread (tensorboardX's own writer thread dies on a full disk and then blocks the run). A
    write that fails is said once, and training goes on."""

    def __init__(self, workdir: Path):
        self.file = self.tb = None
        self.failed = False  # a write failed (said once)
        if jax.process_index() != 0:
            return
        self.workdir = workdir
        self.file = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX.event_file_writer import EventsWriter
        except ImportError:
            return
        self.tb_dir = workdir / "tensorboard"

        def open_events() -> None:
            self.tb_dir.mkdir(exist_ok=True)
            self.tb = EventsWriter(str(self.tb_dir / "events"))

        self._guarded(open_events, self.tb_dir)

    def _guarded(self, write: Callable[[], None], where: Path) -> None:
        try:
            write()
        except OSError as e:  # a full disk: training goes on, and the checkpoints tell
            if not self.failed:
                tqdm.write(f"warning: {where}: cannot write the logs ({e.strerror}); "
                           "training on", file=sys.stderr)
            self.failed = True

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.file is None:
            return

        def log() -> None:
            self.file.write(json.dumps({"step": step, **scalars}) + "\n")
            self.file.flush()

        self._guarded(log, Path(self.file.name))
        if self.tb is not None:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.summary import scalar

            def events() -> None:
                for k, v in scalars.items():
                    self.tb.write_event(Event(wall_time=time.time(), step=step,
                                              summary=scalar(k, v)))
                self.tb.flush()

            self._guarded(events, self.tb_dir)

    def image_path(self, step: int) -> Path:
        return self.workdir / "validation" / f"step_{step:07d}.png"

    def image(self, step: int, image: np.ndarray) -> None:
        """A validation image (uint8), as ``validation/step_NNNNNNN.png`` and in TensorBoard."""
        if self.file is None:
            return
        path = self.image_path(step)
        self._guarded(lambda: save_image(image, path), path.parent)
        if self.tb is not None:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.summary import image as image_summary

            summary = image_summary("validation", image, dataformats="HWC")
            self._guarded(lambda: self.tb.write_event(Event(wall_time=time.time(), step=step,
                                                            summary=summary)), self.tb_dir)

    def close(self) -> None:
        for log in (self.file, self.tb):
            if log is not None:
                with contextlib.suppress(OSError):
                    log.close()


# --------------------------------------------------------------------------- main

DATA_STOP = 65   # EX_DATAERR: the data stopped the run (the step it reached is checkpointed)
IO_STOP = 74     # EX_IOERR: a checkpoint could not be written when the run needed it


class Stopped(RuntimeError):
    """The run stopped before ``total_steps`` for the reason it names (one line), with the step
    it reached checkpointed where the disk allowed; ``code`` is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def held(workdir: Path) -> Iterator[None]:
    """``workdir`` made and locked by process 0 for the run (:mod:`workdir`); every process
    learns whether that worked, so that all of them stop or none."""
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(workdir_lib.Lock(workdir, workdir_lib.make(workdir)))
            except workdir_lib.WorkdirError as e:
                error = e
        if jax.process_count() > 1:
            ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
            if not ok and error is None:
                error = workdir_lib.WorkdirError(f"{workdir}: process 0 could not take it "
                                                 "(see its log)")
        if error is not None:
            raise error
        yield


def train(config: ml_collections.ConfigDict) -> int | None:
    """Runs (or resumes) the configured stage to ``config.total_steps``; on SIGTERM or SIGINT
    it checkpoints the step it is on and returns that step. Raises :class:`Stopped` when the
    data or the disk stop it first."""
    run_config.check(config)
    config.attention_impl = resolve_attention(config.attention_impl, jax.default_backend())
    if why := not_runnable_here(config.attention_impl):
        raise ConfigError(f"config.attention_impl={config.attention_impl!r}: {why}; use "
                          "--config.attention_impl=auto or xla")
    set_matmul_precision(config.matmul_precision)
    config.attention_impl, note = attention_here(config.attention_impl)
    if note and jax.process_index() == 0:
        print(note, file=sys.stderr)
    workdir = Path(config.workdir)
    with held(workdir):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: Path) -> int | None:
    changed = resume.changes(workdir, config)  # every process: all refuse, or none
    if config.validation.roots and config.stage != "tsd":
        raise ConfigError("config.validation.roots: held-out scores are the TSD stage's (the "
                          "teacher stage saves its sample images every validate_every steps)")
    shard_config, mesh = stages.make_mesh(config)
    if jax.process_index() == 0:
        print(f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} over "
              f"{jax.process_count()} process(es); global batch {config.batch_size}")
    model = load_model(config)
    teacher = load_teacher(config, model)
    lpips_params = load_lpips(config)
    frozen = stages.frozen_inputs(config, model, teacher, lpips_params)
    stage = stages.make_stage(config, model)
    held = held_out(config, model)
    if jax.process_index() == 0:
        for line in changed:
            print(f"resume: {line}")
        (workdir / SKIPPED).unlink(missing_ok=True)  # counts this run's skips
        try:
            resume.write(workdir, config, bool(changed))
        except OSError as e:
            raise Stopped(f"{workdir / resume.CONFIG}: cannot write it ({e.strerror})",
                          IO_STOP) from None
    batches = data_iterator(config, model, workdir)

    # ------------------------------------------------------------ on the mesh
    jitted = stages.jit_stage(stage, frozen, mesh, shard_config)
    frozen = sharding.put(frozen, jitted.frozen_shardings)
    state = sharding.put(jax.device_get(stage.state), jitted.state_shardings)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    if checkpoints.latest_step() is not None:
        state, data_state = checkpoints.restore(state)
        batches.set_state(data_state)
        print(f"resumed from step {int(state.step)}")

    def checkpoint(step: int, data_state: dict, final: bool) -> None:
        """Saves ``step``; a failed save stops the run when ``final`` or when more space
        will not help, else training goes on to the next checkpoint due."""
        try:
            checkpoints.save(step, state, data_state)
        except CheckpointWriteError as e:
            if final or e.errno not in SPACE_ERRORS:
                raise Stopped(str(e), IO_STOP) from None
            due = min(config.total_steps, (step // config.checkpoint_every + 1)
                      * config.checkpoint_every)
            tqdm.write(f"warning: {e}; training on (free some space: the next checkpoint is "
                       f"due at step {due})", file=sys.stderr)

    def stop_for_data(step: int, data_state: dict, why: str) -> Stopped:
        """Checkpoints ``step`` (when it is not yet) and says why the data stopped the run."""
        if step == 0:
            return Stopped(f"{why}; no step was trained", DATA_STOP)
        if checkpoints.latest_step() != step:
            checkpoint(step, data_state, final=True)
        return Stopped(f"{why}; step {step} is checkpointed: the same command resumes it",
                       DATA_STOP)

    def validate(step: int, batch: dict) -> dict[str, float]:
        """The held-out scores of ``step`` and its LR | SR | HR panels (without held-out
        samples: the image of the training batch)."""
        if held is None:
            logger.image(step, to_uint8(np.asarray(jitted.validate(state, frozen, batch))))
            return {}
        sr = restore_held_out(jitted.restore, state, frozen, held["lr"], mesh,
                              config.batch_size)
        if jax.process_index() != 0:
            return {}
        lr, hr = validation.to_pixels(held["lr"]), validation.to_pixels(held["hr"])
        sr = validation.to_pixels(sr)
        panels = config.validation.panels
        if panels:
            logger.image(step, validation.panels(lr[:panels], sr[:panels], hr[:panels]))
        scores = validation.scores(sr, hr, lpips_params)
        if scores.get("val/grid", -np.inf) > config.validation.grid_warning:
            tqdm.write(f"warning: step {step}: val/grid {scores['val/grid']:.2f} dB is above "
                       f"{config.validation.grid_warning} dB: the student's outputs show a 16-px "
                       f"grid (see {logger.image_path(step)})", file=sys.stderr)
        return scores

    step_fn = jitted.step
    logger = Logger(workdir)
    start = int(state.step)
    allowed = config.data.max_skipped * len(batches.records) if config.data.skip_invalid else 0
    clock = progress.Clock(config.total_steps, config.batch_size)
    bar = progress.Progress(start, config.total_steps, stage.shown, jax.process_index() == 0)
    preempted = None
    try:
        with Preemption() as preemption, sharding.activate(mesh):
            for step in range(start + 1, config.total_steps + 1):
                position = batches.get_state()
                try:
                    batch = sharding.global_batch(next(batches), mesh)
                except DataError as e:
                    raise stop_for_data(step - 1, position, f"{e} (set "
                                        "--config.data.skip_invalid=True to skip such samples)")
                state, metrics = step_fn(state, frozen, batch)
                if step == start + 1:  # it compiled: the clock starts once it is done
                    jax.block_until_ready(metrics)
                    clock.completed(step)
                stop = preemption.reached(step)
                scalars = None
                if step % config.log_every == 0 or step == config.total_steps or stop:
                    scalars = {k: float(v) for k, v in metrics.items()}  # waits for the step
                    scalars |= clock.completed(step)
                    skipped = _agreed(skipped_samples(workdir))
                    if skipped:
                        scalars["data/skipped"] = skipped
                    if step % config.validate_every == 0:
                        with clock.pause():
                            scalars |= validate(step, batch)
                    logger.write(step, scalars)
                    if skipped > allowed:
                        raise stop_for_data(step, batches.get_state(), (
                            f"{skipped} of the {len(batches.records)} samples cannot be read, "
                            f"more than data.max_skipped={config.data.max_skipped}: they are "
                            f"named in {workdir / SKIPPED}"))
                elif step % config.validate_every == 0:
                    jax.block_until_ready(state)
                    with clock.pause():
                        if scores := validate(step, batch):
                            logger.write(step, scores)
                if stop or step % config.checkpoint_every == 0 or step == config.total_steps:
                    jax.block_until_ready(state)
                    with clock.pause():
                        checkpoint(step, batches.get_state(),
                                   final=stop or step == config.total_steps)
                bar.update(step, scalars)
                if stop:
                    preempted = step
                    break
    finally:
        bar.close()
        logger.close()
        if not isinstance(sys.exc_info()[1], KeyboardInterrupt):  # a second Ctrl-C: now
            checkpoints.close()
    return preempted


def held_out(config: ml_collections.ConfigDict, model: model_dir.Model
             ) -> dict[str, np.ndarray] | None:
    """The held-out samples of ``config.validation`` (None: no roots, said once)."""
    if not config.validation.roots:
        if config.stage == "tsd" and jax.process_index() == 0:
            print("note: no held-out images (--config.validation.roots=DIR[,DIR]): each "
                  "validation saves an image of the training batch, without scores")
        return None
    degradation = run_config.section(config, "data").degradation if config.data.degrade else None
    return validation.held_out(tuple(config.validation.roots), config.validation.num_images,
                               stages.sample_spec(config, model), degradation,
                               config.validation.seed)


def restore_held_out(restore: Callable, state: object, frozen: object, lr: np.ndarray,
                     mesh: jax.sharding.Mesh, batch_size: int) -> np.ndarray:
    """The SR of every held-out LR, ``batch_size`` at a time split over the mesh as the
    training batches are (the last batch padded with copies)."""
    per = batch_size // jax.process_count()
    rows = -(-len(lr) // batch_size) * batch_size
    padded = np.concatenate([lr, np.repeat(lr[-1:], rows - len(lr), axis=0)])
    out = []
    for first in range(0, rows, batch_size):
        mine = padded[first + jax.process_index() * per:first + (jax.process_index() + 1) * per]
        out.append(restore(state, frozen, sharding.global_batch({"lr": mine}, mesh)["lr"]))
    return np.concatenate([np.asarray(x) for x in out])[:len(lr)]


def _agreed(value: int) -> int:
    """Process 0's ``value`` in every process (so that all of them take the same decision)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
