"""The device mesh, and where every array of a run lives on it.

Two mesh axes: ``data`` (plain data parallelism: each slice holds whole weights) and ``fsdp``
(fully sharded data parallelism: a weight is split over the axis and gathered when a layer runs).
A batch is split over both. The rules, in one place:

- the frozen base (and the teacher adapter, LPIPS, the prompts): split over ``fsdp`` along
  their largest dimension that the axis divides; arrays under ``min_shard_size`` elements stay
  whole (replicated);
- the trained adapters and their optimiser states: replicated, or split like the base
  (``adapters = "fsdp"``);
- batches: the leading axis over ``data × fsdp``; activations inside the MMDiT are kept split
  the same way (the logical axis ``activation_batch``).

Everything here works across processes: arrays are assembled from each process's local part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tsdsr_jax.checks import in_range, one_of

PyTree = Any
DATA, FSDP = "data", "fsdp"
BATCH = (DATA, FSDP)
LOGICAL_RULES = (("activation_batch", BATCH),)  # for nn.with_logical_constraint in the models


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """The mesh shape and what is split over ``fsdp``."""

    data: int = -1                  # -1: the devices left over
    fsdp: int = 1
    adapters: str = "replicated"    # replicated | fsdp: the trained LoRA and optimiser states
    min_shard_size: int = 2 ** 18   # arrays with fewer elements stay whole

    def __post_init__(self):
        for name in ("data", "fsdp"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise ValueError(f"{name}={getattr(self, name)}: -1 (fill) or at least 1")
        one_of(self, "adapters", ("replicated", "fsdp"))
        in_range(self, "min_shard_size", low=0)


def make_mesh(config: ShardingConfig, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over all devices (of every process); one size may be -1."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    data, fsdp = config.data, config.fsdp
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of sharding.data and sharding.fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(f"a mesh of data={config.data} x fsdp={config.fsdp} does not fit "
                         f"{n} devices")
    return Mesh(mesh_utils.create_device_mesh((data, fsdp), devices), BATCH)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Split the largest dimension that ``fsdp`` divides; whole if small or none divides."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*(FSDP if d == dim else None for d in range(len(shape))))
    return P()


def shardings(tree: PyTree, mesh: Mesh, split: bool, min_size: int) -> PyTree:
    """A ``NamedSharding`` per leaf of ``tree`` (arrays or shape structs): split over ``fsdp``
    by :func:`fsdp_spec`, or all replicated."""
    fsdp = mesh.shape[FSDP] if split else 1
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp, min_size)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis over ``data × fsdp``."""
    return NamedSharding(mesh, P(BATCH))


def put(tree: PyTree, tree_shardings: PyTree) -> PyTree:
    """Host arrays (the same on every process) as global arrays with these shardings; each
    process copies only the parts its devices hold."""
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree_util.tree_map(one, tree, tree_shardings)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of a batch (its rows, in process order) as the global batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
    """Traces inside see the mesh and the logical rules that keep activations batch-split."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield
