"""Counts and drops skipped examples, enforces the skip-rate limit, and batches.

Runs in the main process after the workers, so one place sees every skip
marker whatever the worker count, and the counts are part of the iterator
state: a restored run reports the same numbers as an uninterrupted one.
Batching happens here too (after the skips are gone), which keeps batches
identical for any number of workers.

Counters (`stats()`), flat so they log as scalars:
  examples_seen, examples_kept,
  skipped/<reason>          examples dropped (records.SKIP_REASONS); these
                            make up the skip rate
  dropped_image/<reason>    images removed from kept documents
  truncated_text            captions cut to seq_len
  shards/<problem>          shards unreadable or truncated when opened
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import grain
import numpy as np

from flamingo_jax.data import workers
from flamingo_jax.errors import DataError
from flamingo_jax.data.records import STATS_KEY, SKIP_REASONS, skip_reason

log = logging.getLogger(__name__)


def scalar_metrics(stats: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
  """{dataset: stats()} (Mixture.stats()) -> flat scalars for metrics.jsonl / TensorBoard.

  Keys are `data/<dataset>/<counter>` (counters as in the module docstring),
  plus `data/<dataset>/skip_rate` (skipped / seen so far, what max_skip_rate
  bounds).
  """
  out: dict[str, float] = {}
  for name, counts in stats.items():
    for k, v in counts.items():
      out[f"data/{name}/{k}"] = float(v)
    seen = counts.get("examples_seen", 0)
    skipped = sum(v for k, v in counts.items() if k.startswith("skipped/"))
    out[f"data/{name}/skip_rate"] = skipped / seen if seen else 0.0
  return out


class SkipRateError(DataError, RuntimeError):
  """Too much bad data: a broken dataset or a bug, not noise to train through.

  A DataError, so CLIs report it as one `error: ...` line (exit status 2)."""


def skip_rate_message(name: str, seen: int, counts: Mapping[str, int],
                      max_skip_rate: float) -> str:
  skipped = {k[len("skipped/"):]: v for k, v in counts.items() if k.startswith("skipped/")}
  total = sum(skipped.values())
  reasons = ", ".join(f"{k}={v} ({SKIP_REASONS.get(k, '')})"
                      for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
  return (f"dataset {name!r}: {total} of {seen} examples skipped "
          f"({100 * total / max(seen, 1):.1f}%), above data.max_skip_rate="
          f"{max_skip_rate}: {reasons}")


class AccountedBatchIterDataset(grain.IterDataset):
  """Examples or skip markers (a MapDataset) -> batches of kept examples [B, ...].

  The MapDataset is read from `next_index` on, through grain's thread pool
  (`read_options`) and, with worker_count > 0, grain worker processes. The
  iterator state is just {next_index, counters}: it does not depend on the
  worker count or on grain's internal state formats, and restoring it
  restarts reading at exactly the next unread element.
  """

  def __init__(self, elements: grain.MapDataset, *, name: str, batch_size: int,
               drop_remainder: bool = True, read_options: grain.ReadOptions | None = None,
               worker_count: int = 0, worker_buffer_size: int = 16,
               max_skip_rate: float = 0.1, skip_check_after: int = 1000,
               log_every: int = 10_000, initial_counts: Mapping[str, int] | None = None):
    self.elements = elements
    self.read_options = read_options or grain.ReadOptions()
    self.worker_count, self.worker_buffer_size = worker_count, worker_buffer_size
    super().__init__(self.read_from(0))
    self.name, self.batch_size, self.drop_remainder = name, batch_size, drop_remainder
    self.max_skip_rate, self.skip_check_after = max_skip_rate, skip_check_after
    self.log_every = log_every
    self.initial_counts = dict(initial_counts or {})

  def read_from(self, next_index: int) -> grain.IterDataset:
    ds = self.elements[next_index:] if next_index else self.elements
    ds = ds.to_iter_dataset(self.read_options)
    if self.worker_count > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.worker_count, per_worker_buffer_size=self.worker_buffer_size),
          worker_init_fn=workers.worker_init_fn())  # workers exit with this process
    return ds

  def __iter__(self) -> "AccountedBatchIterator":
    return AccountedBatchIterator(self)

  def __str__(self) -> str:
    return f"AccountedBatchIterDataset(name={self.name!r}, batch_size={self.batch_size})"


class AccountedBatchIterator(grain.DatasetIterator):

  def __init__(self, ds: AccountedBatchIterDataset):
    super().__init__()
    self._ds = ds
    self._elements = ds.read_from(0).__iter__()
    self._seen = 0  # elements consumed: the index of the next one to read
    self._kept = 0
    self._counts: dict[str, int] = dict(ds.initial_counts)

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    ds = self._ds
    batch: list[dict[str, Any]] = []
    while len(batch) < ds.batch_size:
      try:
        x = next(self._elements)
      except StopIteration:
        if batch and not ds.drop_remainder:
          break
        raise
      self._seen += 1
      reason = skip_reason(x)
      if reason is not None:
        name = f"skipped/{reason}"
        if name not in self._counts:
          detail = x.get("detail", "")
          log.warning("data %s: first %r skip (%s): %s%s", ds.name, reason,
                      SKIP_REASONS.get(reason, ""), x.get("key", ""),
                      f": {detail}" if detail else "")
        self._counts[name] = self._counts.get(name, 0) + 1
      else:
        self._kept += 1
        for k, v in x.pop(STATS_KEY, {}).items():
          self._counts[k] = self._counts.get(k, 0) + int(v)
        batch.append(x)
      self._check()
      if self._seen % ds.log_every == 0:
        log.info("data %s: %s", ds.name, self.stats())
    return {k: np.stack([x[k] for x in batch]) for k in batch[0]}

  def _check(self) -> None:
    ds = self._ds
    skipped = self._seen - self._kept
    if self._seen >= ds.skip_check_after and skipped > ds.max_skip_rate * self._seen:
      raise SkipRateError(skip_rate_message(ds.name, self._seen, self._counts,
                                            ds.max_skip_rate))

  def stats(self) -> dict[str, int]:
    """Counters so far (see the module docstring)."""
    return {"examples_seen": self._seen, "examples_kept": self._kept,
            **dict(sorted(self._counts.items()))}

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._seen, "kept": self._kept, "counts": dict(self._counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    missing = {"next_index", "kept", "counts"} - set(state)
    if missing:
      raise ValueError(f"data state of {self._ds.name!r} lacks {sorted(missing)}: {state}")
    self._elements.close()
    self._seen, self._kept = int(state["next_index"]), int(state["kept"])
    self._counts = {str(k): int(v) for k, v in state["counts"].items()}
    self._elements = self._ds.read_from(self._seen).__iter__()

  def start_prefetch(self) -> None:
    self._elements.start_prefetch()

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._elements.close()

  def __str__(self) -> str:
    return f"AccountedBatchIterator(name={self._ds.name!r})"
