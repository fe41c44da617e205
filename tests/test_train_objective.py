"""The objective: per-dataset mean NLL, weighted accumulation over datasets and
micro-batches, and batches without targets (zero, never NaN)."""
import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.labels import param_labels
from flamingo_jax.trainers.flamingo import objective
from flamingo_jax.training import optim
from flamingo_jax.training.objective import split_micro_batches, token_nll
from flamingo_jax.data import in_memory as train_data
from flamingo_jax.models.config import model_config
from flamingo_jax.config import load_config
from flamingo_jax.models.flamingo import Flamingo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_token_nll_masks_and_never_divides_by_zero():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  targets = jnp.array([[0, 1]])
  total, count = token_nll(logits, targets, jnp.array([[1.0, 1.0]]))
  np.testing.assert_allclose(total, -np.log(0.5) - np.log(0.8), rtol=1e-6)
  assert count == 2
  total, count = token_nll(logits, targets, jnp.array([[0.0, 1.0]]))
  np.testing.assert_allclose(total, -np.log(0.8), rtol=1e-6)
  bad = logits.at[0, 0].set(jnp.nan)  # a masked position cannot poison the sum
  total, count = token_nll(bad, targets, jnp.array([[0.0, 1.0]]))
  np.testing.assert_allclose(total, -np.log(0.8), rtol=1e-6)
  total, count = token_nll(logits, targets, jnp.zeros((1, 2)))
  assert float(total) == 0.0 and float(count) == 0.0


def test_strided_micro_batches():
  batch = {"x": jnp.arange(8)}
  micro = split_micro_batches(batch, 2)["x"]
  np.testing.assert_array_equal(micro, [[0, 2, 4, 6], [1, 3, 5, 7]])
  with pytest.raises(ValueError, match="cannot be split into 3"):
    split_micro_batches(batch, 3)


@pytest.fixture(scope="module")
def setup():
  c = model_config(load_config(os.path.join(REPO, "configs", "tiny.py")))
  c = dataclasses.replace(c, lm=dataclasses.replace(c.lm, num_layers=1),
                          resampler=dataclasses.replace(c.resampler, depth=1),
                          vision=dataclasses.replace(c.vision, name="none"))
  model = Flamingo(c)
  specs = {"docs": train_data.DatasetSpec("docs", "interleaved", 4, 12, 2),
           "pairs": train_data.DatasetSpec("pairs", "pairs", 2, 8, 1)}
  batches = {n: jax.tree.map(jnp.asarray, next(train_data.SyntheticIterator(
      s, c, seed=3, feature_shape=(4, c.vision_feature_dim)))) for n, s in specs.items()}
  init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
  params = nn.unbox(init(jax.random.key(0), batches["pairs"]["tokens"],
                         visual_features=batches["pairs"]["visual_features"]))
  params = params["params"]
  params = jax.tree.map(lambda p: p + 0.01, params)  # gates off zero: every path has gradient
  trainable, frozen = optim.split_params(params, param_labels(params, c))
  return model, c, batches, trainable, frozen


@functools.partial(jax.jit, static_argnums=(0,))
def _reference_grads(model, batch, trainable, frozen, weight):
  """weight * d(mean NLL over the batch's target tokens) / d(trainable), one pass."""

  def loss(p):
    logits, _ = model.apply({"params": optim.merge_params(p, frozen)}, batch["tokens"],
                            visual_features=batch["visual_features"],
                            next_image=batch["next_image"])
    total, count = token_nll(logits, batch["targets"], batch["loss_mask"])
    return weight * total / count

  return jax.grad(loss)(trainable)


def test_accumulation_is_the_weighted_sum_of_per_dataset_gradients(setup):
  model, c, batches, trainable, frozen = setup
  weights = {"docs": 1.0, "pairs": 0.2}
  grad_fn = objective.make_grad_fn(model, weights=weights, micro_batches={"docs": 2})
  grads, metrics = jax.jit(grad_fn)(trainable, frozen, batches, jax.random.key(0))
  ref = jax.tree.map(jnp.add,
                     *[_reference_grads(model, batches[n], trainable, frozen, weights[n])
                       for n in ("docs", "pairs")])
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  assert set(metrics) == {"loss", "loss/docs", "loss/pairs", "target_tokens/docs",
                          "target_tokens/pairs"}
  np.testing.assert_allclose(metrics["loss"], metrics["loss/docs"] + 0.2 * metrics["loss/pairs"],
                             rtol=1e-6)

  # A dataset batch without a single target token adds exactly zero.
  empty = dict(batches["pairs"], loss_mask=jnp.zeros_like(batches["pairs"]["loss_mask"]))
  grads2, metrics2 = jax.jit(grad_fn)(trainable, frozen, {"docs": batches["docs"],
                                                           "pairs": empty}, jax.random.key(0))
  only_docs = _reference_grads(model, batches["docs"], trainable, frozen, 1.0)
  for g, r in zip(jax.tree.leaves(grads2), jax.tree.leaves(only_docs)):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6)
  assert float(metrics2["loss/pairs"]) == 0.0 and float(metrics2["target_tokens/pairs"]) == 0.0
