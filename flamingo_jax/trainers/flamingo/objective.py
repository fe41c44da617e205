"""Flamingo's training objective: the weighted mixture loss, frozen-image encoding, the gate
metric (pure functions, jitted by train.py through training.objective.make_train_step).

Objective (paper appendix B.1.2):  sum_m lambda_m * E_m[ mean NLL of the target
tokens ], m over datasets. Each update draws one batch from every dataset (each
with its own batch size), splits it into micro-batches when memory needs
(`train.micro_batches`), weights each gradient by lambda_m and sums them; then
one optimizer update: gradient clipping happens once, on the sum (OpenFlamingo
clips every micro-step). Round-robin (one dataset per update) is the same step
called with a single dataset.

Per dataset the loss is the mean over its loss_mask tokens of the *whole*
batch (all micro-batches, all hosts), so splitting a batch into micro-batches
or devices never changes the gradient. A batch without any target token
contributes exactly 0 (never 0/0 = NaN).

Batch contract per dataset (B its own batch size):
  tokens [B, L] int32         targets [B, L] int32 (next token at each position)
  loss_mask [B, L] float32    images [B, N, T, H, W, 3] float32
  image_count [B] int32       next_image [B] bool
  optional: visual_features [B, N, T, S, C] instead of images, attention_mask [B, L]
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from flamingo_jax.models.config import FlamingoConfig, xattn_layer_indices
from flamingo_jax.models.layers import dtype_of
from flamingo_jax.models.xattn import tanh_gates
from flamingo_jax.runtime.sharding import batch_shards, batch_spec
from flamingo_jax.training.objective import split_micro_batches, token_nll
from flamingo_jax.training.optim import merge_params

MODEL_INPUTS = ("images", "visual_features", "next_image", "attention_mask", "image_count")


def make_grad_fn(model, *, weights: Mapping[str, float], micro_batches: Mapping[str, int],
                 train_vision: bool = False, mesh: Optional[Mesh] = None) -> Callable:
  """-> grad_fn(params, frozen, batches, rng) -> (grads, metrics).

  params: trainable subtree (float32); frozen: the rest (any dtype);
  batches: {dataset name: batch}; rng: a PRNG key. grads is
  sum_m lambda_m * d(mean NLL_m)/d(params), accumulated in float32.
  `train_vision` is the model's `train` flag (it only switches the vision
  encoder's stochastic depth / dropout, which must stay off while it is frozen).

  With the vision encoder frozen (train_vision False), every dataset's images
  are encoded first, outside the gradient, by `encode_frozen_images` (one
  compiled encoder for the whole mixture instead of one per dataset and
  micro-batch scan), and the losses run on the features: the same losses
  and gradients, since a frozen encoder's output is a constant of the step.
  With train_vision (or the encoder among the trainable params) it runs
  inside each loss, per micro-batch, as before.
  """

  def loss_fn(params, frozen, batch, rng, denom, weight):
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits, _ = model.apply({"params": merge_params(params, frozen)}, batch["tokens"],
                            train=train_vision, rngs={"dropout": rng}, **inputs)
    nll, _ = token_nll(logits, batch["targets"], batch["loss_mask"])
    return weight * nll / denom, nll

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  config = getattr(model, "config", None)
  image_dtype = dtype_of(config.dtype) if isinstance(getattr(config, "dtype", None), str) else None

  def dataset_grads(params, frozen, batch, rng, weight, k):
    count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    denom = jnp.maximum(count, 1.0)
    if k == 1:
      (_, nll), grads = value_and_grad(params, frozen, batch, rng, denom, weight)
      return _f32(grads), nll, count

    def body(carry, xs):
      acc, nll_acc = carry
      micro, i = xs
      (_, nll), g = value_and_grad(params, frozen, micro, jax.random.fold_in(rng, i), denom,
                                   weight)
      return (jax.tree.map(jnp.add, acc, _f32(g)), nll_acc + nll), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    micro = split_micro_batches(batch, k, mesh)
    (grads, nll), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                   (micro, jnp.arange(k)))
    return grads, nll, count

  def grad_fn(params, frozen, batches, rng):
    if not batches:
      raise ValueError("a train step needs at least one dataset batch")
    for name in batches:
      if name not in weights:
        raise ValueError(f"dataset {name!r} has no loss weight; known: {sorted(weights)}")
    if not train_vision and "vision" not in params:
      encode = lambda images: model.apply(  # noqa: E731
          {"params": merge_params(params, frozen)}, images, method="encode_images")
      batches = encode_frozen_images(encode, batches, micro_batches, mesh, image_dtype)
    grads, metrics, total = None, {}, jnp.zeros((), jnp.float32)
    for i, name in enumerate(sorted(batches)):
      g, nll, count = dataset_grads(params, frozen, batches[name], jax.random.fold_in(rng, i),
                                    weights[name], micro_batches.get(name, 1))
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      loss = nll / jnp.maximum(count, 1.0)
      metrics[f"loss/{name}"] = loss
      metrics[f"target_tokens/{name}"] = count
      total = total + weights[name] * loss
    metrics["loss"] = total
    return grads, metrics

  return grad_fn


def encode_frozen_images(encode: Callable, batches: Mapping[str, Mapping[str, jax.Array]],
                         micro_batches: Mapping[str, int], mesh: Optional[Mesh] = None,
                         image_dtype: Any = None) -> dict[str, dict[str, jax.Array]]:
  """Every dataset's `images` -> `visual_features` with a frozen encoder, one compiled call.

  encode: images [b, N, T, H, W, 3] -> features [b, N, T, S, C] (the model's
  `encode_images`). The images of all datasets (same H, W) are laid end to end
  per data-parallel shard ([shards, M, H, W, 3]: no device exchanges rows) and
  encoded in chunks of a fixed size by one loop: XLA compiles the encoder
  once, not once per dataset. The chunk is the largest micro-batch's image
  count per shard, so the encoder's activation memory is what the
  per-micro-batch path needed. image_dtype (the compute dtype) casts the
  images before they are laid out, as every registered encoder casts its
  input first: half the copy in bfloat16, same numbers. The features are
  under stop_gradient (the encoder is frozen); the encoder is per image, so
  they equal those of per-dataset calls up to float rounding. Batches without
  images, or whose batch does not divide over the shards, pass through
  unchanged (their loss encodes them as before).
  """
  shards = batch_shards(mesh) if mesh is not None else 1
  groups: dict[tuple, list[str]] = {}
  for name in sorted(batches):
    images = batches[name].get("images")
    if images is None or images.ndim != 6 or images.shape[0] % shards:
      continue  # left to the loss (which reports a bad shape), as before
    groups.setdefault(tuple(images.shape[3:]), []).append(name)
  out = {name: dict(batch) for name, batch in batches.items()}
  for hwc, names in groups.items():
    per_shard, chunk = {}, 1  # per_shard[n]: images of one shard of dataset n (B/shards*N*T)
    for n in names:
      b, n_img, t = batches[n]["images"].shape[:3]
      per_shard[n] = b // shards * n_img * t
      chunk = max(chunk, -(-b // (micro_batches.get(n, 1) * shards)) * n_img * t)
    total = sum(per_shard.values())
    chunk = min(chunk, total)
    steps = -(-total // chunk)
    parts = [batches[n]["images"].reshape((shards, per_shard[n]) + hwc) for n in names]
    if image_dtype is not None:
      parts = [p.astype(image_dtype) for p in parts]
    if steps * chunk > total:
      parts.append(jnp.zeros((shards, steps * chunk - total) + hwc, parts[0].dtype))
    flat = _batch_constraint(jnp.concatenate(parts, axis=1), mesh)  # [shards, steps * chunk, ...]

    def encode_chunk(i):  # chunk i of every shard -> [shards, chunk, S, C]
      images = jax.lax.dynamic_slice_in_dim(flat, i * chunk, chunk, axis=1)
      images = _batch_constraint(images.reshape((shards * chunk, 1, 1) + hwc), mesh)
      feats = jax.lax.stop_gradient(encode(images)[:, 0, 0])
      return _batch_constraint(feats.reshape((shards, chunk) + feats.shape[1:]), mesh)

    if steps == 1:
      feats = encode_chunk(0)
    else:
      shape = jax.eval_shape(encode_chunk, 0)
      buf = _batch_constraint(jnp.zeros(shape.shape[:1] + (steps * chunk,) + shape.shape[2:],
                                        shape.dtype), mesh)
      feats = jax.lax.fori_loop(0, steps, lambda i, buf: jax.lax.dynamic_update_slice_in_dim(
          buf, encode_chunk(i), i * chunk, axis=1), buf)
    start = 0
    for n in names:
      b, n_img, t = batches[n]["images"].shape[:3]
      part = feats[:, start:start + per_shard[n]]
      start += per_shard[n]
      del out[n]["images"]
      out[n]["visual_features"] = _batch_constraint(
          part.reshape((b, n_img, t) + feats.shape[2:]), mesh)
  return out


def _batch_constraint(x: jax.Array, mesh: Optional[Mesh]) -> jax.Array:
  """x [B, ...] with B over the data-parallel axes (no-op without a mesh)."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec(x.ndim)))


def _f32(tree):
  return jax.tree.map(lambda g: g.astype(jnp.float32), tree)


def gate_metrics(config: FlamingoConfig) -> Callable[[Any], dict[str, jax.Array]]:
  """-> params -> {'gates/<gate>': |tanh(alpha)|} after the update (paper Fig. 6), the
  step's extra_metrics; the scanned layout's gates are named by the LM block they precede."""
  indices = xattn_layer_indices(config.lm.num_layers, config.xattn.every, config.xattn.placement,
                                config.xattn.layers)
  return lambda params: {f"gates/{k}": v for k, v in tanh_gates(params, indices).items()}
