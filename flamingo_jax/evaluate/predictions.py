"""Predictions written as they are made, so an interrupted evaluation continues.

Each (task, shot count, trial) has `predictions/{task}_{shots}shot[_trial{t}].jsonl`:
a header line with the run's fingerprint (model, task files, protocol, seed),
then one line per evaluated example, appended (and flushed) after each batch.
A rerun reads the lines back and evaluates only the examples that are
missing; a header that differs (another model, other shots or decoding) is
an error rather than a silent mix. When every example is done the same rows
go to `{...}.json` (a list, with the references) for people and scripts.
Only process 0 writes; on a multi-host mesh it tells the others what is done.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

import jax
import numpy as np


def file_stem(task: str, shots: int, trial: int) -> str:
  return f"{task}_{shots}shot" + (f"_trial{trial}" if trial else "")


def _broadcast_indices(indices: list[int]) -> list[int]:
  """Process 0's list of done example indices, on every process."""
  if jax.process_count() == 1:
    return indices
  from jax.experimental import multihost_utils
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(indices))))
  arr = np.zeros((max(n, 1),), np.int64)
  arr[:len(indices)] = indices[:n] if jax.process_index() == 0 else 0
  return [int(i) for i in multihost_utils.broadcast_one_to_all(arr)[:n]]


class PredictionLog:
  """The rows of one (task, shots, trial) run: read back, appended, finalised."""

  def __init__(self, out_dir: Optional[str], stem: str, fingerprint: dict):
    self.rows: dict[int, dict] = {}
    self.path = self.final_path = None
    self._writer = jax.process_index() == 0 and bool(out_dir)
    if out_dir:
      directory = os.path.join(out_dir, "predictions")
      self.path = os.path.join(directory, stem + ".jsonl")
      self.final_path = os.path.join(directory, stem + ".json")
    header = {"fingerprint": fingerprint}
    if self._writer:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      if os.path.exists(self.path):
        self._read(header)
      else:
        with open(self.path, "w") as f:
          f.write(json.dumps(header, sort_keys=True) + "\n")
    done = _broadcast_indices(sorted(self.rows))
    if jax.process_index() != 0:
      self.rows = {i: {} for i in done}

  def _read(self, header: dict) -> None:
    with open(self.path) as f:
      lines = f.read().split("\n")
    try:
      first = json.loads(lines[0])
    except json.JSONDecodeError:
      first = None
    ours = json.loads(json.dumps(header, sort_keys=True))
    if first != ours:
      theirs = (first or {}).get("fingerprint", {})
      diff = sorted(k for k in set(theirs) | set(ours["fingerprint"])
                    if theirs.get(k) != ours["fingerprint"].get(k))
      raise ValueError(f"{self.path} holds predictions of another run (differs in "
                       f"{diff or 'its header'}); pass another --out or delete it to start over")
    good = 1
    for n, line in enumerate(lines[1:], start=2):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # the line a kill cut short: drop it and what follows
        break
      self.rows[int(row["index"])] = row
      good = n
    with open(self.path, "w") as f:  # rewrite without a torn tail
      f.write("\n".join(lines[:good]) + "\n")

  def done(self) -> set[int]:
    return set(self.rows)

  def add(self, rows: Iterable[dict]) -> None:
    rows = list(rows)
    for row in rows:
      self.rows[int(row["index"])] = row
    if self._writer:
      with open(self.path, "a") as f:
        f.write("".join(json.dumps(r, default=_plain) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())

  def finish(self, order: Iterable[int]) -> list[dict]:
    """The rows in `order`; writes the .json list once all are there."""
    rows = [self.rows[int(i)] for i in order]
    if self._writer:
      tmp = self.final_path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, default=_plain)
      os.replace(tmp, self.final_path)
    return rows


def _plain(x: Any):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"cannot write {type(x).__name__} to a predictions file")
