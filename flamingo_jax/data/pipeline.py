"""Grain pipelines per dataset, and the mixture the train step draws from.

Per dataset (all grain MapDataset/IterDataset transformations):

  source[shard_index::shard_count]      this JAX process's disjoint share
    .shuffle(seed)                      global shuffle, reshuffled every epoch
    .repeat(num_epochs or forever)
    .random_map(ProcessExample)         tokenise, lay out, decode (workers)
    [next_index:]                       where a restored state resumes
    .to_iter_dataset(ReadOptions)
    .mp_prefetch(worker_count)          deterministic round-robin over workers
    AccountedBatchIterDataset           count and drop skips, batch [B, ...]

Nothing drops or reorders elements before the accounting step, so the
element count it has consumed is the index to resume from: the data state is
{"next_index", counters} per dataset, valid for any worker count.

The paper's update draws one batch from *every* dataset (each with its own
batch size) and accumulates their weighted gradients, so the mixture is not
a sampler: `next(mixture)` returns {dataset name: batch}.
"""
from __future__ import annotations

import logging
import zlib
from typing import Any, Mapping, Optional

import grain
import numpy as np

from flamingo_jax.data.accounting import (AccountedBatchIterDataset, AccountedBatchIterator,
                                          SkipRateError)
from flamingo_jax.data.config import DataConfig, DatasetConfig, data_config, dataset_config
from flamingo_jax.data.sources import make_source
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.data.transforms import ProcessExample

log = logging.getLogger(__name__)


def shard_info(cfg: DataConfig) -> tuple[int, int]:
  """(shard_index, shard_count): the config's, or this JAX process's."""
  if cfg.shard_count >= 0:
    return cfg.shard_index, cfg.shard_count
  import jax
  return jax.process_index(), jax.process_count()


def dataset_seed(seed: int, name: str, *salt: int) -> int:
  """A 32-bit seed per (global seed, dataset name, salt): stable across runs and hosts."""
  h = zlib.crc32(name.encode("utf-8"))
  for s in (seed, *salt):
    h = zlib.crc32(int(s).to_bytes(8, "little", signed=True), h)
  return h


def make_dataset(name: str, cfg: DatasetConfig, data: DataConfig, tokenizer: Tokenizer,
                 shard_index: int = 0, shard_count: int = 1) -> AccountedBatchIterDataset:
  """One dataset's grain pipeline, yielding this shard's batches (module docstring).

  cfg.batch_size is the global batch: each of the shard_count shards (one
  per process) yields batch_size // shard_count rows of it.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
  cfg = dataset_config(cfg, f"data.datasets.{name}")
  if cfg.batch_size % shard_count:
    raise ValueError(f"config key 'data.datasets.{name}.batch_size' ({cfg.batch_size}) must "
                     f"be divisible by the {shard_count} shards (processes) reading it")
  source = make_source(cfg, f"data.datasets.{name} ({cfg.source} source)")
  counts = dict(getattr(source, "counts", {}))
  bad_shards = sum(v for k, v in counts.items() if k.startswith("shards/unreadable"))
  num_files = getattr(source, "num_files", 0)
  if num_files and bad_shards / num_files > data.max_skip_rate:
    raise SkipRateError(f"dataset {name!r}: {bad_shards} of {num_files} shards are "
                        f"unreadable, above data.max_skip_rate={data.max_skip_rate}")
  if len(source) < shard_count:
    raise ValueError(f"dataset {name!r} has {len(source)} examples, fewer than the "
                     f"{shard_count} shards (processes) reading it")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if data.train:
    ds = ds.shuffle(dataset_seed(data.seed, name, 0))
  ds = ds.repeat(data.num_epochs or None)
  ds = ds.random_map(ProcessExample(cfg, data.image, tokenizer, data.train),
                     seed=dataset_seed(data.seed, name, 1, shard_index))
  if data.worker_count > 0:
    _absl_flags_parsed()
  return AccountedBatchIterDataset(
      ds, name=name, batch_size=cfg.batch_size // shard_count, drop_remainder=data.train,
      read_options=grain.ReadOptions(num_threads=data.read_threads,
                                     prefetch_buffer_size=data.read_buffer_size),
      worker_count=data.worker_count, worker_buffer_size=data.worker_buffer_size,
      max_skip_rate=data.max_skip_rate, skip_check_after=data.skip_check_after,
      log_every=data.log_every, initial_counts=counts)


def _absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside absl.app nothing parses them."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class Mixture(grain.DatasetIterator):
  """One iterator per dataset; `next` returns {name: batch} (each its own batch size).

  A grain DatasetIterator, so `grain.checkpoint.CheckpointSave(mixture)` /
  `CheckpointRestore(mixture)` save and restore it with orbax, one JSON file
  per process. The state is a JSON-serialisable dict.
  """

  def __init__(self, iterators: Mapping[str, AccountedBatchIterator],
               configs: Optional[Mapping[str, DatasetConfig]] = None):
    if not iterators:
      raise ValueError("Mixture needs at least one dataset iterator")
    self.iterators = dict(iterators)
    self.configs = dict(configs or {})
    super().__init__(list(self.iterators.values()))

  @property
  def names(self) -> list[str]:
    return list(self.iterators)

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    self._assert_not_closed()
    return {name: next(it) for name, it in self.iterators.items()}

  def stats(self) -> dict[str, dict[str, int]]:
    """Bad-data counters per dataset (accounting.py)."""
    return {name: it.stats() for name, it in self.iterators.items()}

  def get_state(self) -> dict[str, Any]:
    return {name: it.get_state() for name, it in self.iterators.items()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or set(state) != set(self.iterators):
      have = sorted(state) if isinstance(state, dict) else type(state).__name__
      raise ValueError(f"data state holds datasets {have} but the mixture has "
                       f"{sorted(self.iterators)}; a changed data.datasets cannot resume "
                       "from this checkpoint's data state")
    for name, it in self.iterators.items():
      it.set_state(state[name])

  def __str__(self) -> str:
    return f"Mixture({', '.join(self.iterators)})"


def shard_of_rows(name: str, batch_size: int, rows: tuple[int, int]) -> tuple[int, int]:
  """(shard_index, shard_count) of a process that holds rows [start, stop) of the
  global batch: every process holds as many rows, so shard = start // rows."""
  start, stop = (int(r) for r in rows)
  k = stop - start
  if k <= 0 or start < 0 or stop > batch_size or start % k or batch_size % k:
    raise ValueError(f"dataset {name!r}: rows {rows} do not split the global batch of "
                     f"{batch_size} into equal shards")
  return start // k, batch_size // k


def make_train_iterators(cfg: Any, rows: Optional[Mapping[str, tuple[int, int]]] = None,
                         tokenizer: Optional[Tokenizer] = None
                         ) -> dict[str, AccountedBatchIterator]:
  """{dataset name: iterator of this process's rows of its global batch}.

  rows[name] = (start, stop), the rows of the global batch this process's
  devices hold (the trainer's view); without rows, data.shard_index/count or
  the JAX process index/count decide, and each process holds
  batch_size / process_count consecutive rows. A DataConfig is taken as validated
  (the trainers parse the `data` section once); a ConfigDict is parsed here.
  """
  data = cfg if isinstance(cfg, DataConfig) else data_config(cfg)
  if tokenizer is None:
    if not data.tokenizer:
      raise ValueError("config key 'data.tokenizer' is empty and no tokenizer was passed")
    tokenizer = Tokenizer.load(data.tokenizer)
  iterators = {}
  for name, dcfg in data.datasets.items():
    if rows is not None:
      if name not in rows:
        raise ValueError(f"no rows given for dataset {name!r} (rows has {sorted(rows)})")
      shard_index, shard_count = shard_of_rows(name, dcfg.batch_size, rows[name])
      if data.shard_count >= 0 and (shard_index, shard_count) != (data.shard_index,
                                                                  data.shard_count):
        raise ValueError(f"dataset {name!r}: rows {rows[name]} make this process shard "
                         f"{shard_index} of {shard_count}, but the config sets "
                         f"data.shard_index={data.shard_index}, "
                         f"data.shard_count={data.shard_count}")
    else:
      shard_index, shard_count = shard_info(data)
    iterators[name] = iter(make_dataset(name, dcfg, data, tokenizer, shard_index, shard_count))
    log.info("data %s: shard %d of %d, %d rows per batch, %d workers", name, shard_index,
             shard_count, dcfg.batch_size // shard_count, data.worker_count)
  return iterators


def make_mixture(cfg: Any, tokenizer: Optional[Tokenizer] = None) -> Mixture:
  """The training input: a Mixture over `cfg.data.datasets` (ConfigDict or DataConfig)."""
  data = data_config(cfg)
  return Mixture(make_train_iterators(data, tokenizer=tokenizer), data.datasets)


def iterator_states(mixture: Mixture) -> dict[str, Any]:
  """All dataset iterators' states (JSON-serialisable), e.g. for orbax JsonSave."""
  return mixture.get_state()


def restore_iterator_states(mixture: Mixture, states: dict[str, Any]) -> None:
  """Restores what `iterator_states` returned; the next batches are exactly those
  an uninterrupted run would have produced."""
  mixture.set_state(states)
