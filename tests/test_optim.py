"""The optimizer: schedule, labels (frozen leaves have no state and no update),
weight decay, clipping once per update, and the non-finite skip of the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flamingo_jax.training import objective, optim
from flamingo_jax.models.labels import FROZEN, TRAINABLE, param_labels
from flamingo_jax.apps.count_params import abstract_params
from flamingo_jax.trainers.flamingo.layout import make_optimizer


def test_schedule_warmup_then_constant_and_decays():
  c = optim.optim_config({"learning_rate": 1e-4, "warmup_steps": 5000})
  lr = optim.learning_rate_schedule(c, total_steps=500_000)
  np.testing.assert_allclose([lr(0), lr(2500), lr(5000), lr(400_000)],
                             [0.0, 5e-5, 1e-4, 1e-4], rtol=1e-6)
  cos = optim.learning_rate_schedule(optim.optim_config(
      {"warmup_steps": 10, "schedule": "cosine", "end_learning_rate": 1e-5}), total_steps=110)
  np.testing.assert_allclose([cos(10), cos(60), cos(110)], [1e-4, 5.5e-5, 1e-5], rtol=1e-5)
  lin = optim.learning_rate_schedule(optim.optim_config(
      {"warmup_steps": 0, "schedule": "linear"}), total_steps=100)
  np.testing.assert_allclose([lin(0), lin(50), lin(100)], [1e-4, 5e-5, 0.0], atol=1e-10)


def test_bad_optim_config_names_the_key():
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.optim_config({"schedule": "exp"})
  with pytest.raises(ValueError, match="optim.learnin_rate"):
    optim.optim_config({"learnin_rate": 1.0})


def test_frozen_leaves_have_no_optimizer_state(tiny_config):
  """Over the full tree: moments exist for trainable leaves only (set_to_zero has no state)."""
  params = abstract_params(tiny_config)
  tx = make_optimizer(optim.optim_config({}), tiny_config, 100)
  state = jax.eval_shape(tx.init, params)
  labels = traverse_util.flatten_dict(param_labels(params, tiny_config), sep="/")
  n_trainable = sum(1 for v in labels.values() if v != FROZEN)
  n_frozen = len(labels) - n_trainable
  assert n_frozen > 0 and n_trainable > 0
  arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0 or x.size > 1]
  assert len(arrays) == 2 * n_trainable  # Adam's mu and nu, nothing else
  frozen_elems = sum(x.size for k, x in traverse_util.flatten_dict(params, sep="/").items()
                     if labels[k] == FROZEN)
  state_elems = sum(x.size for x in jax.tree.leaves(state))
  trainable_elems = sum(x.size for x in jax.tree.leaves(params)) - frozen_elems
  assert state_elems < 2 * trainable_elems + 16  # + a few step counters
  # Every state leaf sits under a trainable path.
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    keys = []
    for entry in reversed(path):  # the trailing dict keys are the parameter's path
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.insert(0, str(entry.key))
    if leaf.ndim:
      assert labels["/".join(keys)] != FROZEN, keys


def test_frozen_get_no_update_and_decay_follows_labels(tiny_config):
  params = jax.tree.map(lambda a: jnp.ones(a.shape, jnp.float32), abstract_params(tiny_config))
  tx = make_optimizer(optim.optim_config({"warmup_steps": 0, "learning_rate": 0.1,
                                          "weight_decay": 0.5}), tiny_config, 10)
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  ones_grads = jax.tree.map(jnp.ones_like, params)
  labels = traverse_util.flatten_dict(param_labels(params, tiny_config), sep="/")
  for grads in (zero_grads, ones_grads):
    updates, _ = update(grads, state, params)
    flat = traverse_util.flatten_dict(updates, sep="/")
    for k, u in flat.items():
      if labels[k] == FROZEN:
        assert not np.any(np.asarray(u)), k
  updates, _ = update(zero_grads, state, params)
  flat = traverse_util.flatten_dict(updates, sep="/")
  # Zero gradient: only decoupled weight decay moves a parameter.
  np.testing.assert_allclose(flat["xattn_block_0/ffw/up/kernel"], -0.1 * 0.5, rtol=1e-6)
  assert not np.any(np.asarray(flat["resampler/latents"]))  # resampler: no decay


def test_split_and_merge_params(tiny_config):
  params = abstract_params(tiny_config)
  trainable, frozen = optim.split_params(params, param_labels(params, tiny_config))
  assert set(frozen) == {"vision", "lm"}
  assert "resampler" in trainable and "xattn_block_0" in trainable
  merged = optim.merge_params(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)


# --------------------------------------------------------------------------
# The update step with a toy gradient function


def _toy_step(grads_per_dataset, clip_norm=1.0, lr=0.1):
  """make_train_step around a grad_fn that sums fixed per-dataset gradients."""
  params = {"xattn_block_0": {"w": jnp.zeros((3,))}}
  c = optim.optim_config({"warmup_steps": 0, "learning_rate": lr, "clip_norm": clip_norm,
                          "weight_decay": 0.0})
  tx = optim.make_optimizer(c, 10, lambda p: jax.tree.map(lambda _: TRAINABLE, p))

  def grad_fn(p, frozen, batches, rng):
    grads = {"xattn_block_0": {"w": sum(grads_per_dataset[n] * batches[n]
                                        for n in sorted(batches))}}
    return grads, {"loss": jnp.sum(jnp.stack([batches[n] for n in batches]))}

  step = objective.make_train_step(grad_fn, tx, optim.learning_rate_schedule(c, 10))
  state = objective.init_state(params, tx, jax.random.key(0))
  return jax.jit(step), state, tx


def test_clipping_happens_once_on_the_accumulated_gradient():
  g = {"a": jnp.array([3.0, 0.0, 0.0]), "b": jnp.array([0.0, 4.0, 0.0])}
  step, state, tx = _toy_step(g, clip_norm=1.0, lr=1.0)
  new_state, metrics = step(state, {}, {"a": jnp.float32(1.0), "b": jnp.float32(1.0)})
  np.testing.assert_allclose(metrics["grad_norm"], 5.0, rtol=1e-6)  # norm of the sum
  # Adam's first moment after one step is (1 - b1) * clip(sum of gradients):
  # clip(sum) = [0.6, 0.8, 0]; clipping each dataset first would give [1, 1, 0] / ...
  moments = [x for x in jax.tree.leaves(new_state["opt_state"]) if x.shape == (3,)]
  mu, nu = moments
  np.testing.assert_allclose(mu, 0.1 * np.array([0.6, 0.8, 0.0]), rtol=1e-5)
  np.testing.assert_allclose(nu, 0.001 * np.array([0.36, 0.64, 0.0]), rtol=1e-5)
  per_dataset_clip = 0.1 * (np.array([1.0, 0, 0]) + np.array([0, 1.0, 0]))
  assert not np.allclose(mu, per_dataset_clip)


def test_non_finite_gradient_skips_the_update_and_counts():
  g = {"a": jnp.array([1.0, 2.0, 3.0])}
  step, state, _ = _toy_step(g)
  state, _ = step(state, {}, {"a": jnp.float32(1.0)})
  before = jax.tree.map(np.asarray, state)
  for i in range(2):
    state, metrics = step(state, {}, {"a": jnp.float32(jnp.nan)})
    assert int(metrics["update_skipped"]) == 1
    assert int(state["nonfinite_consecutive"]) == i + 1
  after = jax.tree.map(np.asarray, state)
  for key in ("params", "opt_state", "opt_step"):
    jax.tree.map(np.testing.assert_array_equal, before[key], after[key])
  assert int(after["step"]) == 3 and int(after["nonfinite_total"]) == 2
  state, metrics = step(state, {}, {"a": jnp.float32(1.0)})
  assert int(state["nonfinite_consecutive"]) == 0 and int(state["nonfinite_total"]) == 2
  assert int(state["opt_step"]) == 2


def test_extra_metrics_see_the_updated_params():
  """A trainer's own metrics (Flamingo's gates) come from its hook; the step adds none."""
  params = {"w": jnp.zeros((3,))}
  c = optim.optim_config({"warmup_steps": 0, "learning_rate": 0.5, "clip_norm": 0.0,
                          "weight_decay": 0.0})
  tx = optim.make_optimizer(c, 10, lambda p: jax.tree.map(lambda _: TRAINABLE, p))
  grad_fn = lambda p, frozen, batches, rng: ({"w": jnp.ones((3,))}, {"loss": jnp.float32(1.0)})
  state = objective.init_state(params, tx, jax.random.key(0))
  plain = jax.jit(objective.make_train_step(grad_fn, tx, optim.learning_rate_schedule(c, 10)))
  hooked = jax.jit(objective.make_train_step(grad_fn, tx, optim.learning_rate_schedule(c, 10),
                                             extra_metrics=lambda p: {"w0": p["w"][0]}))
  _, metrics = plain(state, {}, {})
  assert "w0" not in metrics and not any(k.startswith("gates/") for k in metrics)
  new_state, metrics = hooked(state, {}, {})
  np.testing.assert_allclose(metrics["w0"], new_state["params"]["w"][0])
  assert float(metrics["w0"]) == pytest.approx(-0.5, rel=1e-4)  # Adam's first step: -lr
