"""RICES: choose few-shot demonstrations by image similarity (Flamingo appendix A.2).

Retrieval-based In-Context Example Selection ranks the support set (the
training examples) by the cosine similarity of their frozen vision features
to the query image's and keeps the k nearest. The nearest goes LAST, right
before the query, where it influences the answer most. Features come from
whatever frozen encoder the caller runs (the paper: the Flamingo vision
encoder; OpenFlamingo: CLIP); this module only ranks them.
"""
from __future__ import annotations

import numpy as np


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"rices_shots: {name} must be [N, D] with N >= 1, got {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError(f"rices_shots: {name} contain NaN or inf")
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  if (norms == 0).any():
    raise ValueError(f"rices_shots: {name} row {int(np.flatnonzero(norms == 0)[0])} is all "
                     "zeros; cosine similarity is undefined")
  return x / norms


def rices_shots(support_features, query_features, num_shots: int, *,
                block_size: int = 1024) -> np.ndarray:
  """[Q, num_shots] support indices per query, least similar first, most similar last.

  support_features [S, D], query_features [Q, D]: frozen vision features (any
  scale; rows are L2-normalised here). Ties in similarity go to the lower
  support index, which then sits nearer the query. Queries are processed
  `block_size` at a time to bound the [block, S] similarity matrix.
  """
  support = _unit_rows(support_features, "support_features")
  queries = _unit_rows(query_features, "query_features")
  if support.shape[1] != queries.shape[1]:
    raise ValueError(f"rices_shots: support features have {support.shape[1]} dims but "
                     f"query features {queries.shape[1]}")
  if not 0 <= num_shots <= support.shape[0]:
    raise ValueError(f"rices_shots: num_shots {num_shots} must be in [0, "
                     f"{support.shape[0]}] (the support set size)")
  out = np.empty((queries.shape[0], num_shots), dtype=np.int64)
  if num_shots == 0:
    return out
  index = np.arange(support.shape[0])
  for start in range(0, queries.shape[0], block_size):
    sims = queries[start:start + block_size] @ support.T  # [B, S]
    # The k-th largest similarity bounds the candidates; everything tied with
    # it stays in, then an exact (similarity desc, index asc) sort picks k.
    kth = np.partition(sims, -num_shots, axis=1)[:, -num_shots]
    for row, (sim, bound) in enumerate(zip(sims, kth)):
      cand = np.flatnonzero(sim >= bound)
      best = cand[np.lexsort((index[cand], -sim[cand]))][:num_shots]
      out[start + row] = best[::-1]
  return out
