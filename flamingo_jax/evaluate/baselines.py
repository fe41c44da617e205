"""The two baselines a trained Flamingo is compared with (demo report, ablations).

* gates at zero: the same parameters with every tanh gate alpha set to 0, so
  each GATED XATTN-DENSE block is the identity and the model computes its
  frozen LM alone (the paper's initialisation);
* chance: predictions that ignore the image: a random support-set caption,
  a random support-set answer, a uniformly random class; scored with the
  task's own metric on the same evaluated examples, averaged over seeds.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from flamingo_jax.evaluate.config import METRICS, EvalConfig
from flamingo_jax.evaluate.inputs import prompt_fields
from flamingo_jax.evaluate.run import Task, score_predictions, select_queries
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.labels import component_of

GATES = ("attn_gate", "ffw_gate")


def zero_gates(params: Mapping) -> dict:
  """params with every xattn block's gates at 0 (tanh(0) = 0: the LM alone)."""
  out = dict(params)
  blocks = [k for k in params if _is_xattn(k)]
  if not blocks:
    raise ValueError("zero_gates: the param tree has no xattn_block_* / xattn_blocks (not a "
                     "Flamingo tree?)")
  for k in blocks:
    block = dict(params[k])
    for gate in GATES:
      if gate in block:
        block[gate] = jnp.zeros_like(block[gate])
    out[k] = block
  return out


def chance(config: FlamingoConfig, ec: EvalConfig, tasks: Sequence[str],
           num_samples: int = 0, seeds: int = 5) -> dict[str, dict[str, Any]]:
  """{task: {'metric', 'score', 'scores'}}: image-blind random predictions on the
  examples `run.evaluate` scores (same subset and seed)."""
  out = {}
  for name in tasks:
    if name not in ec.tasks:
      raise ValueError(f"chance: unknown eval task {name!r}; the config's eval.tasks has "
                       f"{sorted(ec.tasks)}")
    task = Task(name, ec.tasks[name], ec, config)
    queries = select_queries(len(task.test), num_samples, ec.seed)
    kind = task.t.kind
    scores = []
    for seed in range(seeds):
      rng = np.random.default_rng(seed)
      option_scores = None
      if kind == "captioning":
        picks = rng.integers(0, len(task.support), len(queries))
        predictions = {int(q): task.support[i].captions[0] for q, i in zip(queries, picks)}
      elif kind == "vqa":
        picks = rng.integers(0, len(task.support), len(queries))
        predictions = {int(q): prompt_fields(task.support[i], task.t)["answer"]
                       for q, i in zip(queries, picks)}
      else:
        option_scores = rng.random((len(queries), len(task.classes)))
        predictions = {int(q): task.classes[int(np.argmax(r))]
                       for q, r in zip(queries, option_scores)}
      score, _ = score_predictions(task, predictions, option_scores, queries)
      scores.append(float(score))
    out[name] = {"metric": METRICS[kind], "score": float(np.mean(scores)),
                 "scores": scores, "num_examples": int(len(queries))}
  return out


def gates_are_zero(params: Mapping) -> bool:
  """True when every gate alpha is exactly 0."""
  return all(bool(jnp.all(params[k][g] == 0)) for k in params if _is_xattn(k)
             for g in GATES if g in params[k])


def _is_xattn(top_key: str) -> bool:
  """A cross-attention block (`xattn_block_{i}`) or their stack (`xattn_blocks`, scan_layers)."""
  return component_of(top_key) == "xattn"

