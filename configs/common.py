"""What both training stages share. The sections take their defaults from the dataclasses that
check them (:func:`section`), so that each default has one home; each stage's config overrides
only what differs."""

import dataclasses
import types
import typing

import ml_collections

from tsdsr_jax.data.degrade import DegradeConfig
from tsdsr_jax.sharding import ShardingConfig
from tsdsr_jax.training.run_config import ValidationSection


def section(cls: type, **values) -> ml_collections.ConfigDict:
    """A config section of ``cls``'s defaults, with ``values`` (for fields without a default,
    or to differ from it). A field left None keeps its type, so that ``--config.KEY=VALUE``
    can set it."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for name, value in dataclasses.asdict(cls(**values)).items():
        if value is None:
            hint = hints[name]
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            value = ml_collections.FieldReference(None, field_type=hint)
        fields[name] = value
    return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 43
    c.precision = "bf16"              # compute dtype of the frozen base (LoRA stays float32)
    # float32 matmuls and convolutions: default (TF32 on Ampere and Hopper GPUs) | highest
    c.matmul_precision = "default"
    c.remat_policy = "full"           # none | full | dots: rematerialise MMDiT and VAE blocks
    # auto (cuDNN on a GPU, splash on a TPU) | cudnn | splash | xla | None (jax's choice)
    c.attention_impl = ml_collections.FieldReference("auto", field_type=str)
    c.data = ml_collections.ConfigDict(dict(
        roots=("data/train",), resolution=512, degrade=False, num_workers=4,
        # an unreadable sample is skipped, named in WORKDIR/skipped_samples.txt and counted
        # (data/skipped); the run checkpoints and stops once more than max_skipped of the
        # samples were (skip_invalid=False: at the first)
        skip_invalid=True, max_skipped=0.01,
        shards=0))                    # data streams (0: one per process)
    # the Real-ESRGAN degradation that makes the LR with data.degrade=True (SeeSR's settings)
    c.data.degradation = section(DegradeConfig)
    # held-out folders scored every validate_every steps: val/psnr, val/ssim, val/lpips and
    # val/grid (dB of 16-px grid energy; a line warns above grid_warning)
    c.validation = section(ValidationSection)
    # the mesh: data x fsdp devices (-1: fill); the frozen base is split over fsdp
    c.sharding = section(ShardingConfig)
    c.log_every = 10
    c.validate_every = 500
    c.keep_checkpoints = 3
    return c
