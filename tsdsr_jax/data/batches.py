"""The grain pipeline that feeds the train step: shuffled, sharded per process, batched,
prefetched in worker processes, with a checkpointable iterator.

::

    it = iter(train_batches(DataConfig(roots=[...], batch_size=2)))
    batch = next(it)        # {['lr',] 'hr': (B,512,512,3) in [-1,1], 'prompt_embeds': (B,333,4096),
                            #  'pooled_prompt_embeds': (B,2048)[, 'latent_hr': (B,64,64,16)]}
    state = it.get_state()  # a small dict; it.set_state(state) continues exactly from here

Across processes, :class:`ProcessBatches` gives each process its rows of every global batch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from tsdsr_jax.data.degrade import DegradeConfig
from tsdsr_jax.data.layout import Record, scan
from tsdsr_jax.data.source import SampleLoader, SampleSpec


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how. ``shard_index``/``shard_count`` default to this JAX process's."""

    roots: tuple[str | os.PathLike, ...]
    batch_size: int
    seed: int = 0
    num_epochs: int | None = None          # None: repeat forever (reshuffled every epoch)
    degradation: DegradeConfig | None = None  # None: read lr_bicubic/; else make the LR
    lr: bool = True                        # False: no LR at all (the teacher stage)
    spec: SampleSpec = dataclasses.field(default_factory=SampleSpec)
    latents: bool | None = None            # require latent_hr/ (None: if the roots have it)
    skip_invalid: bool = False             # drop (and log) broken samples instead of raising
    skipped_report: str | None = None      # with skip_invalid: a file that names each one
    num_workers: int = 0                   # grain worker processes (0: in this process)
    num_threads: int = 2                   # reading threads per process
    shard_index: int | None = None
    shard_count: int | None = None


def records_of(config: DataConfig) -> list[Record]:
    """The samples of ``config.roots`` that the stage reads (:func:`scan`)."""
    return scan(list(config.roots), read_lr=config.lr and config.degradation is None,
                latents=config.latents, skip_invalid=config.skip_invalid)[0]


def train_batches(config: DataConfig, records: list[Record] | None = None) -> grain.IterDataset:
    """The batches of this process's shard, as a grain ``IterDataset`` (iterate it for a
    ``DatasetIterator`` with ``get_state``/``set_state``); ``records`` as :func:`records_of`
    gives them (read when None).

    Shard k of n is the strided slice ``records[k::n]``, every shard the same size (the remainder
    is dropped) so that all processes run the same number of steps per epoch. Each shard is
    shuffled by a seeded permutation that changes every epoch; the degradation is seeded by
    (seed, shard, position in the stream), so a given (seed, step) always yields the same batch.
    """
    index = jax.process_index() if config.shard_index is None else config.shard_index
    count = jax.process_count() if config.shard_count is None else config.shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count}")
    records = records_of(config) if records is None else records
    usable = len(records) // count * count
    if usable == 0:
        raise ValueError(f"{len(records)} records cannot be split into {count} shards")
    degradation = config.degradation if config.lr else None
    loader = SampleLoader(config.spec, degradation, (config.seed, index), config.skip_invalid,
                          config.skipped_report)
    ds = (grain.MapDataset.source(records[:usable])[index::count]
          .shuffle(seed=config.seed)
          .repeat(config.num_epochs)
          .map_with_index(loader)
          .to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                             prefetch_buffer_size=2 * config.batch_size))
          .batch(config.batch_size, drop_remainder=True))
    if config.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (their defaults here)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return ds


class ProcessBatches:
    """This process's rows of every global batch: the next batch of each of its data shards,
    concatenated. Process ``k`` of ``P`` reads shards ``k·S/P … (k+1)·S/P − 1`` of ``shards``
    (``S``), each a :func:`train_batches` stream of ``batch_size / S`` samples.

    So the global batch is the same whether one process or ``S`` read it. All shards advance
    together, so one position describes them all: ``get_state`` is the first shard's, and
    ``set_state`` applies it to every shard (also after a change in the number of processes).
    With ``skip_invalid``, shards that dropped different samples drift apart by those samples;
    a resume then puts every shard at the first shard's position."""

    def __init__(self, config: DataConfig, shards: int, process_index: int | None = None,
                 process_count: int | None = None):
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        if shards % count or config.batch_size % shards:
            raise ValueError(f"{shards} data shards cannot be split over {count} processes "
                             f"and a batch of {config.batch_size}")
        per = shards // count
        self.records = records_of(config)
        self.iterators = [iter(train_batches(dataclasses.replace(
            config, batch_size=config.batch_size // shards, shard_index=k, shard_count=shards),
            self.records)) for k in range(index * per, (index + 1) * per)]

    def __iter__(self) -> ProcessBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return self.iterators[0].get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        for it in self.iterators:
            it.set_state(state)
