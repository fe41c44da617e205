"""Close-ended scoring: rank options by log-likelihood, then top-k accuracy or ROC-AUC.

Flamingo scores ImageNet, HatefulMemes and the other close-ended tasks by
ranking each candidate answer by the model's log-likelihood of it after the
prompt. Long class names would lose to short ones on a summed log-likelihood,
so the ranking uses the mean per token (`option_scores`, as OpenFlamingo
does). Everything here is NumPy on the host: the model only supplies the
per-token log-probabilities.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def option_scores(token_logprobs, lengths: Optional[Sequence[int]] = None, *,
                  normalize: bool = True) -> np.ndarray:
  """Log-likelihood of each option, averaged over its tokens when `normalize`.

  token_logprobs: [..., O, T] log p(token) of each option's tokens, padded
    after `lengths` (any pad value); or, with lengths=None, a list of O 1-D
    ragged sequences.
  lengths: [..., O] number of real tokens of each option (>= 1).
  Returns [..., O] float64.
  """
  if lengths is None:
    rows = [np.asarray(r, dtype=np.float64) for r in token_logprobs]
    if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
      raise ValueError("option_scores: without lengths, token_logprobs must be a non-empty "
                       "list of non-empty 1-D sequences")
    sums = np.array([r.sum() for r in rows])
    return sums / np.array([r.size for r in rows]) if normalize else sums
  lp = np.asarray(token_logprobs, dtype=np.float64)
  ln = np.asarray(lengths)
  if lp.ndim < 2 or ln.shape != lp.shape[:-1]:
    raise ValueError(f"option_scores: token_logprobs [..., O, T] {lp.shape} and lengths "
                     f"[..., O] {ln.shape} do not match")
  if not np.issubdtype(ln.dtype, np.integer) or (ln < 1).any() or (ln > lp.shape[-1]).any():
    raise ValueError(f"option_scores: lengths must be integers in [1, {lp.shape[-1]}], "
                     f"got {ln.min()}..{ln.max()}")
  mask = np.arange(lp.shape[-1]) < ln[..., None]
  sums = np.where(mask, lp, 0.0).sum(-1)
  return sums / ln if normalize else sums


def rank_options(scores) -> np.ndarray:
  """[..., O] option indices, best first; ties keep the lower index first."""
  scores = np.asarray(scores, dtype=np.float64)
  if np.isnan(scores).any():
    raise ValueError("rank_options: scores contain NaN")
  return np.argsort(-scores, axis=-1, kind="stable")


def top_k_accuracy(scores, labels, k: int = 1) -> float:
  """Fraction of rows whose label is among the k best-scored classes.

  scores [N, C] (higher is better), labels [N] ints in [0, C). Ties rank the
  lower class index first, so a constant score row counts as predicting 0.
  """
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 2 or labels.shape != scores.shape[:1]:
    raise ValueError(f"top_k_accuracy: need scores [N, C] and labels [N], got "
                     f"{scores.shape} and {labels.shape}")
  if scores.shape[0] == 0:
    raise ValueError("top_k_accuracy: no examples")
  if not 1 <= k <= scores.shape[1]:
    raise ValueError(f"top_k_accuracy: k={k} must be in [1, {scores.shape[1]}]")
  if (not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any()
      or (labels >= scores.shape[1]).any()):
    raise ValueError(f"top_k_accuracy: labels must be class indices in "
                     f"[0, {scores.shape[1]})")
  top = rank_options(scores)[:, :k]
  return float((top == labels[:, None]).any(axis=1).mean())


def roc_auc(labels, scores) -> float:
  """Area under the ROC curve (HatefulMemes), same value as sklearn's roc_auc_score.

  labels [N] in {0, 1} (1 = positive, hateful), scores [N] (higher = more
  positive). Computed as the Mann-Whitney statistic with tied scores counted
  one half, which is the trapezoidal ROC area.
  """
  y = np.asarray(labels)
  s = np.asarray(scores, dtype=np.float64)
  if y.ndim != 1 or s.shape != y.shape:
    raise ValueError(f"roc_auc: need labels [N] and scores [N], got {y.shape} and {s.shape}")
  if not np.isin(y, (0, 1)).all():
    raise ValueError("roc_auc: labels must be 0 or 1")
  if np.isnan(s).any():
    raise ValueError("roc_auc: scores contain NaN")
  pos = y == 1
  n_pos, n_neg = int(pos.sum()), int((~pos).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError("roc_auc: needs both positive and negative examples, got "
                     f"{n_pos} positive and {n_neg} negative")
  # Average ranks (1-based) with ties sharing the mean of their positions.
  order = np.argsort(s, kind="stable")
  sorted_s = s[order]
  starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
  ends = np.r_[starts[1:], s.size]
  ranks = np.empty(s.size)
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def positive_probability(scores, positive: int = 1) -> np.ndarray:
  """[N, O] option scores -> [N] softmax probability of option `positive`.

  Turns the two HatefulMemes options ("no", "yes") into the one score per
  meme that ROC-AUC needs.
  """
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 2 or not 0 <= positive < scores.shape[1]:
    raise ValueError(f"positive_probability: need scores [N, O] with 0 <= positive < O, "
                     f"got shape {scores.shape} and positive={positive}")
  z = scores - scores.max(axis=1, keepdims=True)
  p = np.exp(z)
  return p[:, positive] / p.sum(axis=1)
