"""Cloud TPU slices, from Google's public specifications, as targets of the TPU compiler.

A slice is named as Google Cloud names its accelerator types: ``v5e-8`` is 8 chips of TPU v5e,
``v5p-8`` is 8 TensorCores (4 chips of two cores, one JAX device each). libtpu describes its
topology without a TPU (``jax.experimental.topologies``, as MaxText's ``train_compile.py`` plans
pods), and XLA's TPU compiler then plans a program for it: memory per chip, collectives.
"""

from __future__ import annotations

import dataclasses
import math
import os

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation (per chip, from cloud.google.com/tpu/docs/system-architecture-tpu-vm)."""

    description: str          # jax's device_kind
    memory_bytes: int         # HBM
    bandwidth: float          # HBM bytes/s
    bf16_flops: float         # peak dense bf16 FLOP/s
    cores_per_chip: int       # TensorCores that the type's name counts
    chips_per_host: int       # on a slice of several hosts
    single_host_chips: int    # the largest slice that is one host
    usd_per_chip_hour: float  # on-demand list price, us-central (cloud.google.com/tpu/pricing)


CHIPS = {
    "v5e": Chip("TPU v5 lite", 16 * GIB, 819e9, 197e12, 1, 4, 8, 1.20),
    "v5p": Chip("TPU v5", 95 * GIB, 2765e9, 459e12, 2, 4, 4, 4.20),
    "v6e": Chip("TPU v6 lite", 32 * GIB, 1640e9, 918e12, 1, 4, 8, 2.70),
}
GCLOUD_NAMES = {"v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}  # gcloud's accelerator types


class SliceError(ValueError):
    """A slice name that is not a Cloud TPU accelerator type of :data:`CHIPS`."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """A Cloud TPU slice: ``generation`` chips in a ``shape`` grid over ``hosts`` hosts."""

    name: str
    generation: str
    shape: tuple[int, ...]
    hosts: int

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology(self) -> str:
        """libtpu's name of the topology (``v5e:2x4``)."""
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """The grid of chips on one host, as libtpu takes it."""
        return (*_grid(2, self.chips // self.hosts), 1)

    @property
    def accelerator_type(self) -> str:
        """gcloud's name of the slice (``v5litepod-8``)."""
        return f"{GCLOUD_NAMES[self.generation]}-{self.name.partition('-')[2]}"


def _grid(dims: int, chips: int) -> tuple[int, ...]:
    """The ``dims``-D grid of a power of two of chips that Google Cloud gives: each doubling
    goes to the last of the shortest sides (8: 2x4; 64: 8x8; 3D, 16: 2x2x4)."""
    shape = [1] * dims
    for _ in range(chips.bit_length() - 1):
        shortest = min(shape)
        shape[max(i for i in range(dims) if shape[i] == shortest)] *= 2
    return tuple(shape)


def parse(name: str) -> Slice:
    """``v5e-8``, ``v5p-8``, ``v6e-64``, ... as a :class:`Slice`."""
    generation, _, count = name.partition("-")
    if generation not in CHIPS or not count.isdigit() or int(count) < 1:
        raise SliceError(f"{name}: not a TPU slice; give GENERATION-COUNT, a generation of "
                         f"{', '.join(CHIPS)} (for example v5e-8)")
    chip = CHIPS[generation]
    cores = int(count)
    chips = cores // chip.cores_per_chip
    if cores % chip.cores_per_chip or chips & (chips - 1) or (generation == "v5p" and chips < 4):
        unit = (f"TensorCores ({chip.cores_per_chip} per chip)" if chip.cores_per_chip > 1
                else "chips")
        least = " of at least 8" if generation == "v5p" else ""
        raise SliceError(f"{name}: the count must be a power of two{least}: {unit}")
    hosts = 1 if chips <= chip.single_host_chips else chips // chip.chips_per_host
    shape = (2, 2, 1) if generation == "v5p" and chips == 4 else _grid(
        3 if generation == "v5p" else 2, chips)
    return Slice(name, generation, shape, hosts)


def devices(slice_name: str) -> list:
    """The devices of the slice ``slice_name`` (one per chip), for the TPU compiler; needs
    libtpu (``pip install -e '.[tpu]'``), not a TPU."""
    from jax.experimental import topologies

    s = parse(slice_name)
    # what libtpu would read off a TPU VM (without them it prints warnings and asks the
    # metadata server); a real TPU VM's own values stay. Compiling uses no TPU, so processes
    # that compile at once need not take libtpu's lock (/tmp/libtpu_lockfile) in turn.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topology = topologies.get_topology_desc(
            topology_name=s.topology, platform="tpu",
            chips_per_host_bounds=s.chips_per_host_bounds)
    except Exception as e:  # noqa: BLE001 -- libtpu raises plain errors when absent or unusable
        raise NoTPUCompiler(f"cannot compile for a TPU with this jax ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]}); install libtpu: "
                            "pip install -e '.[tpu]'") from None
    return list(topology.devices)


class NoTPUCompiler(RuntimeError):
    """libtpu is not installed, so nothing can be compiled for a TPU here."""
