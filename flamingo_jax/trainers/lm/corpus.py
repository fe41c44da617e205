"""The LM trainer's corpus pipeline: text lines -> token rows -> batch k of an epoch.

The corpus (`corpus.paths`, one document a line) is tokenised as <BOS> ids <EOS>
(no <BOS> when the tokenizer's add_bos is False, as in the Flamingo layouts),
concatenated and cut into rows of seq_len + 1 tokens; `corpus.val_fraction` of the
rows is held out for a validation loss. Batch k of an epoch is a fixed function of
(seed, k), and the batch index is the iterator's state (saved in every checkpoint),
so a resumed run replays exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np
from etils import epath

from flamingo_jax.config import check, from_config_dict
from flamingo_jax.data.layouts import prefix
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """`corpus` section: the text and how it becomes rows."""
  paths: tuple[str, ...] = ()  # text files, one document a line
  tokenizer: str = ""  # sentencepiece .model (or a Hugging Face tokenizer)
  seq_len: int = 64  # tokens a row feeds the LM (rows hold seq_len + 1)
  val_fraction: float = 0.02  # rows held out for the validation loss


def corpus_config(cfg: Any) -> CorpusConfig:
  """The validated `corpus` section; errors name the key."""
  c = from_config_dict(CorpusConfig, cfg or {}, "corpus")
  check(c.seq_len > 0, f"config key 'corpus.seq_len' must be a positive int, got {c.seq_len}")
  check(0.0 <= c.val_fraction < 0.5, f"config key 'corpus.val_fraction' must be in [0, 0.5), "
        f"got {c.val_fraction}")
  return c


def load_tokenizer(c: CorpusConfig) -> Tokenizer:
  """corpus.tokenizer, loaded."""
  if not c.tokenizer:
    raise ConfigError("config key 'corpus.tokenizer' is empty")
  return Tokenizer.load(c.tokenizer)


def corpus_rows(c: CorpusConfig, tokenizer, seed: int,
                lines: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, val rows) [N, seq_len + 1] of corpus.paths (or `lines`, in memory)."""
  if lines is None:
    if not c.paths:
      raise ConfigError("config key 'corpus.paths' is empty (text files, a document a line)")
    lines = [line for p in c.paths for line in epath.Path(p).read_text().splitlines()]
  return split_rows(token_rows(lines, tokenizer, c.seq_len), c.val_fraction, seed)


def token_rows(lines: Sequence[str], tokenizer, seq_len: int) -> np.ndarray:
  """Lines -> <BOS> ids <EOS> concatenated, cut into rows [N, seq_len + 1] int32."""
  info = tokenizer.info
  stream: list[int] = []
  for line in lines:
    line = line.strip()
    if line:
      stream.extend([*prefix(info), *tokenizer.encode(line), info.eos_id])
  n = len(stream) // (seq_len + 1)
  if n < 2:
    raise DataError(f"lm_pretrain: the corpus has {len(stream)} tokens, fewer than two rows "
                    f"of seq_len + 1 = {seq_len + 1}; use a longer corpus or a shorter seq_len")
  return np.asarray(stream[:n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1)


def split_rows(rows: np.ndarray, val_fraction: float, seed: int):
  """(train rows, val rows): a seeded permutation, the first val_fraction held out."""
  order = np.random.default_rng(seed).permutation(len(rows))
  n_val = int(round(len(rows) * val_fraction))
  return rows[order[n_val:]], rows[order[:n_val]]


def batch_at(rows: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Batch `step` [B, L + 1]: epoch e is a permutation seeded by (seed, e)."""
  per_epoch = max(len(rows) // batch_size, 1)
  epoch, k = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(len(rows))
  idx = order[(k * batch_size + np.arange(batch_size)) % len(rows)]
  return rows[idx]


def lm_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
  """Rows [B, L + 1] -> objective's batch: tokens, targets [B, L] int32, loss_mask [B, L]."""
  return {"tokens": rows[:, :-1], "targets": rows[:, 1:],
          "loss_mask": np.ones(rows[:, 1:].shape, np.float32)}


class RowBatches:
  """This process's rows of batch k = batch_at(rows, k, ...); the state is k."""

  def __init__(self, rows: np.ndarray, batch_size: int, seed: int, local: tuple[int, int]):
    self.rows, self.batch_size, self.seed, self.local = rows, batch_size, seed, local
    self.batch_index = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = batch_at(self.rows, self.batch_index, self.batch_size, self.seed)
    self.batch_index += 1
    return lm_batch(batch[self.local[0]:self.local[1]])

  def get_state(self) -> dict:
    return {"batch_index": int(self.batch_index)}

  def set_state(self, state: dict) -> None:
    self.batch_index = int(state["batch_index"])
