"""The update step every trainer shares, and its generic pieces (pure functions, jitted by
the trainers).

A trainer's grad_fn(params, frozen, batches, rng) -> (grads, metrics) computes its loss
(metrics['loss'] the total); make_train_step wraps it into one optimizer update with the
non-finite skip: non-finite gradients (or loss) leave parameters and optimizer state
unchanged, only the step and the non-finite counters move (OpenFlamingo's NaN skip threw
away the accumulated gradients of the other datasets; here nothing is applied and nothing
is lost but that one step). token_nll is the masked next-token loss, split_micro_batches
the strided split of a batch for gradient accumulation.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flamingo_jax.runtime.sharding import BATCH_AXES


def token_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
  """logits [B, L, V], targets [B, L] int, loss_mask [B, L] -> (sum of masked NLL, mask sum).

  Computed in float32 as logsumexp - logit[target]; masked positions are
  selected out (not multiplied), so a non-finite logit there cannot leak in.
  """
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  mask = loss_mask.astype(jnp.float32)
  total = jnp.sum(jnp.where(mask > 0, nll * mask, 0.0))
  return total, jnp.sum(mask)


def split_micro_batches(batch: Mapping[str, jax.Array], k: int,
                        mesh: Optional[Mesh] = None) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...], micro-batch i = rows i, i+k, i+2k, ...

  Strided so that every device keeps its own rows (no resharding) when the
  batch dimension is sharded in contiguous blocks.
  """
  out = {}
  for name, x in batch.items():
    b = x.shape[0]
    if b % k:
      raise ValueError(f"batch {name!r} of size {b} cannot be split into {k} micro-batches")
    y = jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
    if mesh is not None:
      spec = P(None, BATCH_AXES, *([None] * (x.ndim - 1)))
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
    out[name] = y
  return out


def init_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> dict:
  """The training state (everything a checkpoint holds but frozen weights and data).

  params: trainable subtree; rng: a PRNG key (stored as raw uint32 key data).
  """
  return {
      "step": jnp.zeros((), jnp.int32),  # updates attempted (= batches consumed per dataset)
      "opt_step": jnp.zeros((), jnp.int32),  # updates applied (drives the LR schedule)
      "params": params,
      "opt_state": tx.init(params),
      "rng": jax.random.key_data(rng),
      "nonfinite_consecutive": jnp.zeros((), jnp.int32),
      "nonfinite_total": jnp.zeros((), jnp.int32),
  }


def make_train_step(grad_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_shardings: Any = None,
                    extra_metrics: Optional[Callable[[Any], Mapping[str, jax.Array]]] = None
                    ) -> Callable:
  """-> step(state, frozen, batches) -> (state, metrics): one optimizer update.

  grad_shardings (optional NamedSharding tree): layout for the accumulated
  gradient, e.g. the ZeRO-1 layout of the optimizer moments, so the reduction
  over data-parallel devices becomes a reduce-scatter.
  extra_metrics(new_params) -> scalars of the updated parameters (a trainer's own,
  e.g. Flamingo's gate values), merged into the step's metrics.
  """

  def step(state, frozen, batches):
    params = state["params"]
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    grads, metrics = grad_fn(params, frozen, batches, step_rng)
    if grad_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])

    def apply(operands):
      params, opt_state = operands
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    new_params, new_opt_state = jax.lax.cond(finite, apply, lambda operands: operands,
                                             (params, state["opt_state"]))
    consecutive = jnp.where(finite, 0, state["nonfinite_consecutive"] + 1)
    new_state = {
        "step": state["step"] + 1,
        "opt_step": state["opt_step"] + finite.astype(jnp.int32),
        "params": new_params,
        "opt_state": new_opt_state,
        "rng": jax.random.key_data(rng),
        "nonfinite_consecutive": consecutive.astype(jnp.int32),
        "nonfinite_total": (state["nonfinite_total"] + (~finite).astype(jnp.int32)),
    }
    metrics = dict(metrics)
    metrics.update(
        grad_norm=grad_norm,
        learning_rate=jnp.asarray(schedule(state["opt_step"]), jnp.float32),
        update_skipped=(~finite).astype(jnp.int32),
        nonfinite_consecutive=new_state["nonfinite_consecutive"],
        nonfinite_total=new_state["nonfinite_total"],
    )
    if extra_metrics is not None:
      metrics.update(extra_metrics(new_params))
    return new_state, metrics

  return step
