"""Flamingo's parameters and state, nothing allocated: which leaves train (the optimizer
partition of models.labels), the init split into trainable (float32) and frozen
(train.frozen_dtype) trees, their shapes and shardings, and each dataset's batch shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flamingo_jax.data import in_memory
from flamingo_jax.model_dir import init_inputs
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.labels import param_labels
from flamingo_jax.runtime import sharding
from flamingo_jax.training import optim
from flamingo_jax.training import state as state_lib


def make_optimizer(c: optim.OptimConfig, model_cfg: FlamingoConfig,
                   total_steps: int) -> optax.GradientTransformation:
  """The library's optimizer over Flamingo's labels (model.frozen, model.no_weight_decay):
  AdamW on cross-attention, without decay on the resampler, nothing on frozen towers."""
  return optim.make_optimizer(c, total_steps, lambda params: param_labels(params, model_cfg))


def _init(model: Flamingo, model_cfg: FlamingoConfig) -> Callable:
  """rng -> boxed params, from the model directory's init inputs (one definition)."""
  inputs = init_inputs(model_cfg)
  tokens = inputs.pop("tokens")
  return lambda rng: model.init(rng, tokens, **inputs)["params"]


def make_init_params(model: Flamingo, model_cfg: FlamingoConfig, frozen_dtype):
  """rng -> (trainable params in float32, frozen params in frozen_dtype)."""
  init = _init(model, model_cfg)
  return lambda rng: split_and_cast(init(rng), model_cfg, frozen_dtype)


def split_and_cast(boxed: Any, model_cfg: FlamingoConfig, frozen_dtype) -> tuple[dict, dict]:
  """Boxed params (arrays or ShapeDtypeStructs) -> (trainable in float32, frozen in
  frozen_dtype)."""
  params = nn.unbox(boxed)
  trainable, frozen = optim.split_params(params, param_labels(params, model_cfg))
  return optim.cast_tree(trainable, jnp.float32), optim.cast_tree(frozen, frozen_dtype)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Shapes and shardings of everything the step touches, nothing allocated."""
  train_abs: Any  # trainable params (ShapeDtypeStruct tree)
  frozen_abs: Any  # frozen params
  state_abs: Any  # objective.init_state(...) tree
  state_sh: Any  # NamedSharding trees, same structures
  frozen_sh: Any
  grad_sh: Any  # accumulated-gradient layout under ZeRO-1, else None
  param_specs: Any  # PartitionSpec per parameter (full tree), for logs and golden files


def state_layout(model: Flamingo, model_cfg: FlamingoConfig, tx, mesh, mesh_cfg,
                 frozen_dtype=jnp.bfloat16) -> StateLayout:
  """eval_shape of init -> logical axes -> mesh shardings (rules, fallback, ZeRO-1)."""
  boxed = state_lib.boxed_params(_init(model, model_cfg), mesh)
  param_specs = sharding.param_specs(boxed, mesh, mesh_cfg)
  train_specs, frozen_specs = optim.split_params(
      param_specs, param_labels(nn.unbox(boxed), model_cfg))
  # the shapes of the one eval_shape above (tracing init again cost as much again)
  train_abs, frozen_abs = split_and_cast(boxed, model_cfg, frozen_dtype)
  ts = state_lib.train_state(train_abs, train_specs, tx, mesh, mesh_cfg)
  return StateLayout(train_abs=train_abs, frozen_abs=frozen_abs, state_abs=ts.abstract,
                     state_sh=ts.shardings, frozen_sh=sharding.named(mesh, frozen_specs),
                     grad_sh=ts.grad_shardings, param_specs=param_specs)


def abstract_batch(spec: in_memory.DatasetSpec, model: FlamingoConfig, image_size: int,
                   feature_positions: int) -> dict:
  """ShapeDtypeStructs of one dataset's global batch."""
  b, length, n, t = spec.batch_size, spec.seq_len, spec.max_images, spec.num_frames
  sds = jax.ShapeDtypeStruct
  out = {"tokens": sds((b, length), jnp.int32), "targets": sds((b, length), jnp.int32),
         "loss_mask": sds((b, length), jnp.float32), "image_count": sds((b,), jnp.int32),
         "next_image": sds((b,), jnp.bool_)}
  if model.vision.name == "none":
    out["visual_features"] = sds((b, n, t, feature_positions, model.vision_feature_dim),
                                 jnp.float32)
  else:
    out["images"] = sds((b, n, t, image_size, image_size, 3), jnp.float32)
  return out


def memory_report(compiled, state_abs, state_sh, frozen_abs, frozen_sh) -> dict:
  """Bytes per device: parameters, optimizer state (from shardings), compiled buffers."""
  return state_lib.memory_report(compiled, {
      "trainable_params": (state_abs["params"], state_sh["params"]),
      "optimizer_state": (state_abs["opt_state"], state_sh["opt_state"]),
      "frozen_params": (frozen_abs, frozen_sh)})
