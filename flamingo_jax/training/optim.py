"""The optimizer every trainer uses: AdamW by label, schedules, the trainable/frozen split.

A trainer names each parameter leaf with a label (models.labels): `frozen` leaves map to
optax.set_to_zero, whose state is empty, so an optimizer built here over a full
parameter tree holds moments for trainable leaves only; `trainable` leaves get AdamW
with weight decay, `trainable_no_decay` leaves AdamW without. Global-norm clipping
happens once per update, on the accumulated gradient (paper appendix B.1.2), and a
trainer may clip groups of leaves their own way in between (the contrastive towers).
Trainers go further and hand the optimizer the trainable subtree alone
(`split_params`), so frozen weights never get gradients.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from flamingo_jax.config import from_config_dict
from flamingo_jax.errors import ConfigError
from flamingo_jax.models.labels import FROZEN, TRAINABLE, TRAINABLE_NO_DECAY

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """`optim` section of a config."""
  learning_rate: float = 1e-4
  warmup_steps: int = 5000
  schedule: str = "constant"  # after warm-up: constant | cosine | linear (decay to end)
  end_learning_rate: float = 0.0  # cosine / linear: value at train.total_steps
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.1  # on 'trainable' leaves; 'trainable_no_decay' get none
  clip_norm: float = 1.0  # global norm of the accumulated gradient; 0 disables


def optim_config(cfg: Any, cls: type = OptimConfig) -> OptimConfig:
  """The validated `optim` section as `cls` (OptimConfig or a trainer's subclass)."""
  c = cfg if isinstance(cfg, cls) else from_config_dict(cls, cfg or {}, "optim")
  if c.schedule not in SCHEDULES:
    raise ConfigError(f"config key 'optim.schedule' is {c.schedule!r}; expected one of "
                     f"{list(SCHEDULES)}")
  for key in ("learning_rate", "end_learning_rate", "weight_decay", "clip_norm", "eps"):
    if getattr(c, key) < 0:
      raise ConfigError(f"config key 'optim.{key}' must be >= 0, got {getattr(c, key)}")
  if c.warmup_steps < 0:
    raise ConfigError(f"config key 'optim.warmup_steps' must be >= 0, got {c.warmup_steps}")
  for key in ("b1", "b2"):
    if not 0.0 <= getattr(c, key) < 1.0:
      raise ConfigError(f"config key 'optim.{key}' must be in [0, 1), got {getattr(c, key)}")
  return c


def learning_rate_schedule(c: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up 0 -> learning_rate over warmup_steps, then c.schedule."""
  warmup = optax.linear_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1))
  if c.warmup_steps == 0:
    warmup = optax.constant_schedule(c.learning_rate)
  decay_steps = max(total_steps - c.warmup_steps, 1)
  if c.schedule == "constant":
    after = optax.constant_schedule(c.learning_rate)
  elif c.schedule == "cosine":
    alpha = c.end_learning_rate / c.learning_rate if c.learning_rate else 0.0
    after = optax.cosine_decay_schedule(c.learning_rate, decay_steps, alpha=alpha)
  else:
    after = optax.linear_schedule(c.learning_rate, c.end_learning_rate, decay_steps)
  return optax.join_schedules([warmup, after], [c.warmup_steps])


def make_optimizer(c: OptimConfig, total_steps: int, labels: Callable[[Any], Any],
                   group_clip: Optional[optax.GradientTransformation] = None
                   ) -> optax.GradientTransformation:
  """clip(global norm) -> group_clip -> {trainable: AdamW(wd), trainable_no_decay: AdamW(0),
  frozen: 0}.

  labels(params) -> a tree like params with FROZEN, TRAINABLE or TRAINABLE_NO_DECAY per
  leaf, computed from whatever tree the optimizer is given (the full tree or a subtree).
  group_clip: clipping of the trainer's own leaf groups, after the global clip (e.g.
  AGC on one tower, a global norm on another).
  """
  lr = learning_rate_schedule(c, total_steps)
  adam = dict(learning_rate=lr, b1=c.b1, b2=c.b2, eps=c.eps)
  labelled = optax.multi_transform(
      {TRAINABLE: optax.adamw(weight_decay=c.weight_decay, **adam),
       TRAINABLE_NO_DECAY: optax.adamw(weight_decay=0.0, **adam),
       FROZEN: optax.set_to_zero()}, labels)
  chain = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm else []
  chain += [group_clip] if group_clip is not None else []
  return optax.chain(*chain, labelled) if chain else labelled


# --------------------------------------------------------------------------
# Trainable / frozen split


def split_params(params: Any, labels: Any) -> tuple[dict, dict]:
  """params, their label tree -> (trainable, frozen): two nested dicts of disjoint leaves."""
  flat_labels = traverse_util.flatten_dict(labels, sep="/")
  flat = traverse_util.flatten_dict(params, sep="/")
  trainable = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
  return (traverse_util.unflatten_dict(trainable, sep="/"),
          traverse_util.unflatten_dict(frozen, sep="/"))


def merge_params(trainable: dict, frozen: dict) -> dict:
  """Inverse of split_params."""
  flat = traverse_util.flatten_dict(frozen, sep="/")
  overlap = flat.keys() & traverse_util.flatten_dict(trainable, sep="/").keys()
  if overlap:
    raise ValueError(f"parameters both trainable and frozen: {sorted(overlap)[:5]}")
  flat.update(traverse_util.flatten_dict(trainable, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def cast_tree(tree: Any, dtype) -> Any:
  """Floating leaves to dtype (frozen weights are stored in bfloat16)."""
  def cast(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype) if hasattr(x, "astype") else jax.ShapeDtypeStruct(x.shape, dtype)
    return x
  return jax.tree.map(cast, tree)


def state_specs(abstract_opt_state: Any, abstract_params: Any, param_specs: Any,
                moment_spec_fn=None) -> Any:
  """PartitionSpec per optimizer-state leaf.

  A leaf whose trailing dict-key path and shape are a parameter's (Adam's mu
  and nu) takes that parameter's spec, or moment_spec_fn(spec, shape) (ZeRO-1);
  anything else (step counters) is replicated.
  """
  shapes = traverse_util.flatten_dict(abstract_params, sep="/")
  specs = traverse_util.flatten_dict(param_specs, sep="/")

  def one(path, leaf):
    keys = []
    for entry in reversed(path):
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.insert(0, str(entry.key))
    name = "/".join(keys)
    if name in specs and tuple(shapes[name].shape) == tuple(leaf.shape):
      spec = specs[name]
      return moment_spec_fn(spec, leaf.shape) if moment_spec_fn else spec
    return P()

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)
