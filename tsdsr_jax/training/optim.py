"""The optimiser of every trained adapter: AdamW with diffusers' learning-rate schedules (linear
warm-up, then constant or cosine decay) and global-norm gradient clipping, as the official
training scripts configure it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tsdsr_jax.checks import in_range, one_of

SCHEDULES = ("constant_with_warmup", "cosine", "cosine_with_restarts")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with diffusers' warm-up + cosine schedules and global-norm clipping; the defaults
    are the official training script's."""

    learning_rate: float
    warmup_steps: int = 3000
    total_steps: int | None = None  # the decay's horizon (None: the run's total_steps)
    schedule: str = "cosine"  # constant_with_warmup | cosine | cosine_with_restarts
    num_cycles: float = 0.5   # cosine: half a period; with restarts: the number of restarts
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0

    def __post_init__(self):
        in_range(self, "learning_rate", low=0)
        in_range(self, "warmup_steps", low=0)
        in_range(self, "total_steps", low=1)
        one_of(self, "schedule", SCHEDULES)
        in_range(self, "num_cycles", above=0)
        in_range(self, "b1", 0, below=1)
        in_range(self, "b2", 0, below=1)
        in_range(self, "eps", above=0)
        in_range(self, "weight_decay", low=0)
        in_range(self, "max_grad_norm", above=0)


def for_run(section: Mapping[str, Any], total_steps: int) -> OptimConfig:
    """The optimiser config of a run's section: its horizon is the run's ``total_steps``
    unless the section sets its own (as diffusers' scripts derive theirs from
    ``--max_train_steps``)."""
    config = OptimConfig(**section)
    if config.total_steps is None:
        config = dataclasses.replace(config, total_steps=total_steps)
    return config


def lr_schedule(config: OptimConfig) -> optax.Schedule:
    """diffusers' ``get_scheduler``: linear warm-up from 0, then constant or cosine decay
    (``config.total_steps`` set)."""
    if config.total_steps is None:
        raise ValueError("total_steps=None: resolve it with for_run()")

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.float32(max(config.warmup_steps, 1))
        progress = (step - config.warmup_steps) / max(config.total_steps - config.warmup_steps, 1)
        if config.schedule == "constant_with_warmup":
            decay = jnp.float32(1.0)
        elif config.schedule == "cosine":
            decay = jnp.maximum(0.0, 0.5 * (1 + jnp.cos(jnp.pi * 2 * config.num_cycles
                                                          * progress)))
        else:  # cosine_with_restarts
            decay = jnp.where(progress >= 1, 0.0, 0.5 * (1 + jnp.cos(
                jnp.pi * jnp.mod(config.num_cycles * progress, 1.0))))
        factor = jnp.where(step < config.warmup_steps, step / warmup, decay)
        return config.learning_rate * factor
    return schedule


def optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Clipping, then AdamW on :func:`lr_schedule`."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(lr_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay))


def next_learning_rate(config: OptimConfig, opt_state: optax.OptState) -> jax.Array:
    """The learning rate of the next update of an :func:`optimizer`'s state (the value
    diffusers' scripts log: skipped updates do not advance it)."""
    counts = [s.count for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
        if isinstance(s, optax.ScaleByScheduleState)]
    return lr_schedule(config)(counts[0])
