"""The training config, ``--config FILE [--config.key=value ...]`` (an ``ml_collections``
``get_config()`` file): read, and every key, type, range and choice checked before anything
loads or compiles.

Each section is checked by the dataclass that reads it (:func:`tsdsr_jax.checks.build`): the
optimiser, TSD, flow-matching and sharding sections by their own configs, the rest by the
dataclasses below. A key is required unless its dataclass has a default.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from tsdsr_jax.checks import SEEDS, build, in_range, one_of
from tsdsr_jax.data.degrade import DegradeConfig
from tsdsr_jax.diffusion.denoiser import MULTIPLE
from tsdsr_jax.evaluation.grid import GRID_WARNING
from tsdsr_jax.models import MATMUL_PRECISIONS, PRECISIONS
from tsdsr_jax.models.mmdit import ATTENTION_IMPLS
from tsdsr_jax.sharding import ShardingConfig
from tsdsr_jax.training.flow_matching import FlowMatchingConfig
from tsdsr_jax.training.optim import OptimConfig
from tsdsr_jax.training.tsd import TSDConfig

STAGES = ("tsd", "teacher")
REMAT_POLICIES = ("none", "full", "dots")


class ConfigError(ValueError):
    """A run that cannot start; said before anything compiles."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The top-level values that both stages read."""

    stage: str
    model: str                  # a model directory, or "tiny"
    workdir: str
    seed: int
    total_steps: int
    batch_size: int             # global, split over all devices
    precision: str
    matmul_precision: str       # default (TF32 on Ampere/Hopper GPUs) | highest (true fp32)
    remat_policy: str
    attention_impl: str | None
    log_every: int
    validate_every: int
    checkpoint_every: int
    keep_checkpoints: int

    def __post_init__(self):
        one_of(self, "stage", STAGES)
        for name in ("model", "workdir"):
            if not getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r}: must not be empty")
        in_range(self, "seed", 0, below=SEEDS)
        for name in ("total_steps", "batch_size", "log_every", "validate_every",
                     "checkpoint_every", "keep_checkpoints"):
            in_range(self, name, low=1)
        one_of(self, "precision", PRECISIONS)
        one_of(self, "matmul_precision", MATMUL_PRECISIONS)
        one_of(self, "remat_policy", REMAT_POLICIES)
        one_of(self, "attention_impl", ("auto", *ATTENTION_IMPLS))


@dataclasses.dataclass(frozen=True)
class TSDRunConfig(RunConfig):
    init_student: str           # random | model
    teacher: str                # lora | sd3 | a teacher run's checkpoints folder
    student_rank: int
    student_vae_rank: int
    fake_score_rank: int

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "init_student", ("random", "model"))
        if not self.teacher:
            raise ValueError("teacher='': 'lora', 'sd3' or a teacher run's checkpoints folder")
        for name in ("student_rank", "student_vae_rank", "fake_score_rank"):
            in_range(self, name, low=1)


@dataclasses.dataclass(frozen=True)
class TeacherRunConfig(RunConfig):
    init_teacher: str           # random | model
    teacher_rank: int

    def __post_init__(self):
        super().__post_init__()
        one_of(self, "init_teacher", ("random", "model"))
        in_range(self, "teacher_rank", low=1)


@dataclasses.dataclass(frozen=True)
class DataSection:
    roots: tuple[str, ...]
    resolution: int             # HR crops, pixels
    degrade: bool               # make the LR on the fly (else read lr_bicubic/)
    num_workers: int
    skip_invalid: bool          # skip unreadable samples (named and counted), else stop
    max_skipped: float          # stop once more than this share of the samples was skipped
    shards: int                 # data streams (0: one per process)
    degradation: DegradeConfig = dataclasses.field(default_factory=DegradeConfig)  # with degrade

    def __post_init__(self):
        if not self.roots or not all(self.roots):
            raise ValueError(f"roots={self.roots!r}: one or more dataset folders")
        in_range(self, "resolution", low=MULTIPLE)
        if self.resolution % MULTIPLE:
            raise ValueError(f"resolution={self.resolution}: must be a multiple of {MULTIPLE} "
                             "(the VAE's 8 times the transformer's patch of 2)")
        in_range(self, "num_workers", low=0)
        in_range(self, "max_skipped", 0, 1)
        in_range(self, "shards", low=0)


@dataclasses.dataclass(frozen=True)
class ValidationSection:
    """The held-out images scored every ``validate_every`` steps (none: an image of the
    training batch is saved instead)."""

    roots: tuple[str, ...] = ()   # held-out folders in the dataset layout
    num_images: int = 16          # a fixed subset: evenly spaced over the sorted samples
    panels: int = 4               # LR | SR | HR rows saved as the step's image
    seed: int = 0                 # of the degradation of their LR (with data.degrade)
    grid_warning: float = GRID_WARNING  # dB of val/grid above which a line warns

    def __post_init__(self):
        if not all(self.roots):
            raise ValueError(f"roots={self.roots!r}: held-out dataset folders, or none")
        in_range(self, "num_images", low=1)
        in_range(self, "panels", 0, self.num_images)
        in_range(self, "seed", 0, below=SEEDS)


@dataclasses.dataclass(frozen=True)
class SampleSection:
    """The teacher stage's validation sampler."""

    num_steps: int
    guidance_scale: float
    strength: float             # img2img: the share of the schedule that is denoised

    def __post_init__(self):
        in_range(self, "num_steps", low=1)
        in_range(self, "guidance_scale", low=0)
        in_range(self, "strength", above=0, high=1)


SECTIONS = {
    "tsd": (TSDRunConfig, {"tsd": TSDConfig, "optim_student": OptimConfig,
                           "optim_fake_score": OptimConfig, "data": DataSection,
                           "sharding": ShardingConfig, "validation": ValidationSection}),
    "teacher": (TeacherRunConfig, {"flow": FlowMatchingConfig, "optim_teacher": OptimConfig,
                                   "data": DataSection, "sharding": ShardingConfig,
                                   "sample": SampleSection, "validation": ValidationSection}),
}


def check(config: ml_collections.ConfigDict) -> None:
    """Every key of ``config`` known, present, of its type and in range, for its stage."""
    values = config.to_dict()
    stage = values.get("stage")
    if stage not in SECTIONS:
        raise ConfigError(f"config.stage={stage!r}: one of " + ", ".join(map(repr, STAGES)))
    top, sections = SECTIONS[stage]
    try:
        for name, cls in sections.items():
            if not isinstance(values.get(name), dict):
                raise ValueError(f"{name}: missing section")
            build(cls, values[name], name)
        build(top, {k: v for k, v in values.items() if k not in sections})
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


def section(config: ml_collections.ConfigDict, name: str) -> object:
    """The checked dataclass of the section ``name`` of a config that :func:`check` passed."""
    return build(SECTIONS[config.stage][1][name], config[name].to_dict(), name)


def read(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """``--config FILE`` and its ``--config.key=value`` overrides, checked (:func:`check`);
    the ``roots`` of ``data`` and ``validation`` split at commas."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        raise ConfigError("--config: give a config file, e.g. --config configs/tsd.py")
    argv = ["train", *argv]
    values = flags.FlagValues()
    # sys_argv: the overrides are found in argv (by default config_flags reads sys.argv)
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    try:
        values(argv)
        config = values.config
        config.keys()  # a config file that failed to load raises only when first read
    except Exception as e:
        raise _read_error(e, argv) from None
    for name in ("data", "validation"):  # --config.data.roots=A,B: two folders
        if isinstance(config.get(name), ml_collections.ConfigDict) and "roots" in config[name]:
            roots = config[name].roots
            if isinstance(roots, (tuple, list)):
                config[name].roots = tuple(p for r in roots for p in str(r).split(","))
    check(config)
    return config


def _config_file(argv: Sequence[str]) -> str | None:
    """The path that ``--config FILE[:ARG]`` names, if any."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.partition("=")[2].partition(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].partition(":")[0]
    return None


def _read_error(error: Exception, argv: Sequence[str]) -> Exception:
    """The one-line :class:`ConfigError` of an error in reading the config: where the config
    file raised, an override of a key the config lacks, or what config_flags says; any other
    error as it is."""
    path = _config_file(argv)
    chain, seen = error, set()
    while chain is not None and path and id(chain) not in seen:  # the config file raised?
        seen.add(id(chain))
        frames = [f for f in traceback.extract_tb(chain.__traceback__)
                  if os.path.realpath(f.filename) == os.path.realpath(path)]
        if frames:
            text = " ".join(str(chain).split())[:300]
            return ConfigError(f"--config {path}:{frames[-1].lineno}: "
                               f"{type(chain).__name__}: {text}")
        chain = chain.__cause__ or chain.__context__
    if isinstance(error, (AttributeError, KeyError)):  # an override of a key the config lacks
        key = str(error).strip("\"'")
        given = " ".join(a for a in argv if f".{key}=" in a or a.endswith(f".{key}"))
        return ConfigError(f"--config: the config has no key {key!r} ({given})")
    if isinstance(error, (flags.Error, OSError, TypeError, ValueError, SyntaxError)):
        lines = [line.strip() for line in str(error.__cause__ or error).splitlines()
                 if line.strip()]
        return ConfigError(f"--config: {lines[-1] if lines else type(error).__name__}")
    return error
