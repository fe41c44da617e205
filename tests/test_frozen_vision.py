"""The frozen vision encoder runs once for the whole mixture (objective.encode_frozen_images):
the same losses and gradients as encoding inside every dataset's loss, one compiled encoder,
and a trainable encoder (train_vision) still gets its gradients."""
import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from flamingo_jax.config import load_config
from flamingo_jax.models.config import model_config
from flamingo_jax.data import in_memory as train_data
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.labels import param_labels
from flamingo_jax.trainers.flamingo import objective
from flamingo_jax.training import optim
from flamingo_jax.training.objective import token_nll
from flamingo_jax.runtime.sharding import MESH_AXES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = {"docs": 1.0, "pairs": 0.2, "video": 0.5}
MICRO = {"docs": 2, "video": 2}
PATCH_IN = 8 * 8 * 3  # the tiny patch encoder's patch_embed input width


def _setup(frozen):
  c = model_config(load_config(os.path.join(REPO, "configs", "tiny.py")))
  c = dataclasses.replace(c, lm=dataclasses.replace(c.lm, num_layers=1),
                          resampler=dataclasses.replace(c.resampler, depth=1), frozen=frozen)
  model = Flamingo(c)
  specs = {"docs": train_data.DatasetSpec("docs", "interleaved", 4, 12, 2),
           "pairs": train_data.DatasetSpec("pairs", "pairs", 2, 8, 1),
           "video": train_data.DatasetSpec("video", "pairs", 4, 8, 1, num_frames=2)}
  batches = {n: jax.tree.map(jnp.asarray, next(train_data.SyntheticIterator(
      s, c, seed=3, dataset_index=i))) for i, (n, s) in enumerate(specs.items())}
  init = _jit(model.init)
  params = nn.unbox(init(jax.random.key(0), batches["video"]["tokens"],
                         images=batches["video"]["images"]))["params"]
  params = jax.tree.map(lambda p: p + 0.01, params)  # gates off zero: every path has gradient
  trainable, frozen_params = optim.split_params(params, param_labels(params, c))
  return model, batches, trainable, frozen_params


@pytest.fixture(scope="module")
def frozen_vision():
  return _setup(("vision", "lm"))


def _jit(fn, **kw):
  """Compiled without LLVM's optimisation passes: the same numbers, a fraction of the time."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


@functools.partial(_jit, static_argnums=(0,))
def _reference(model, batches, trainable, frozen):
  """The path before: every dataset's loss calls the whole model on its images."""

  def loss(p, batch, weight):
    logits, _ = model.apply({"params": optim.merge_params(p, frozen)}, batch["tokens"],
                            images=batch["images"], next_image=batch["next_image"])
    total, count = token_nll(logits, batch["targets"], batch["loss_mask"])
    return weight * total / count, total / count

  grads, losses = None, {}
  for name in sorted(batches):
    (_, losses[name]), g = jax.value_and_grad(loss, has_aux=True)(trainable, batches[name],
                                                                   WEIGHTS[name])
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
  return grads, losses


def _check_equal(grads, metrics, ref_grads, ref_losses):
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  for name, loss in ref_losses.items():
    np.testing.assert_allclose(metrics[f"loss/{name}"], loss, rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def _encoder_calls(fn, *args) -> int:
  """How many times the traced step applies the patch encoder's first matmul."""

  def walk(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general" and eqn.invars[0].aval.shape[-1] == PATCH_IN:
        n += 1
      for sub in jax.core.jaxprs_in_params(eqn.params):
        n += walk(sub)
    return n

  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.slow
def test_frozen_encoder_once_same_losses_and_grads(frozen_vision):
  model, batches, trainable, frozen = frozen_vision
  assert "vision" not in trainable
  grad_fn = objective.make_grad_fn(model, weights=WEIGHTS, micro_batches=MICRO)
  grads, metrics = _jit(grad_fn)(trainable, frozen, batches, jax.random.key(0))
  _check_equal(grads, metrics, *_reference(model, batches, trainable, frozen))
  assert _encoder_calls(grad_fn, trainable, frozen, batches, jax.random.key(0)) == 1
  # Before: one encoder per dataset (each inside its loss and micro-batch scan).
  per_dataset = objective.make_grad_fn(model, weights=WEIGHTS, micro_batches=MICRO,
                                       train_vision=True)
  assert _encoder_calls(per_dataset, trainable, frozen, batches, jax.random.key(0)) == 3


def test_encode_frozen_images_keeps_rows_on_their_shard(frozen_vision):
  """On a 4-way data-parallel mesh: features equal per-dataset encoding, row for row, and
  the step's gradients are unchanged."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  model, batches, trainable, frozen = frozen_vision
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 2, 2, 1), MESH_AXES)
  params = optim.merge_params(trainable, frozen)
  encode = lambda images: model.apply({"params": params}, images,  # noqa: E731
                                      method="encode_images")
  out = _jit(lambda b: objective.encode_frozen_images(encode, b, MICRO, mesh))(batches)
  # pairs' 2 rows do not divide over 4 shards: left to its loss, as before
  assert "images" in out["pairs"] and "visual_features" not in out["pairs"]
  for name in ("docs", "video"):
    batch = batches[name]
    assert "images" not in out[name]
    np.testing.assert_allclose(out[name]["visual_features"], _jit(encode)(batch["images"]),
                               rtol=1e-4, atol=1e-4, err_msg=name)  # float32 rounding
    np.testing.assert_array_equal(out[name]["tokens"], batch["tokens"])
  grad_fn = objective.make_grad_fn(model, weights=WEIGHTS, micro_batches=MICRO, mesh=mesh)
  grads, metrics = _jit(grad_fn)(trainable, frozen, batches, jax.random.key(0))
  _check_equal(grads, metrics, *_reference(model, batches, trainable, frozen))


@pytest.mark.slow
def test_trainable_vision_keeps_per_dataset_path():
  """train_vision (the unfrozen-encoder ablation): the encoder gets its gradient."""
  model, batches, trainable, frozen = _setup(("lm",))
  assert "vision" in trainable
  grad_fn = objective.make_grad_fn(model, weights=WEIGHTS, micro_batches=MICRO,
                                   train_vision=True)
  grads, metrics = _jit(grad_fn)(trainable, frozen, batches, jax.random.key(0))
  _check_equal(grads, metrics, *_reference(model, batches, trainable, frozen))
  assert float(jnp.abs(grads["vision"]["patch_embed"]["kernel"]).max()) > 0
  # A trainable encoder is never encoded outside the gradient, whatever the flag says.
  default = objective.make_grad_fn(model, weights=WEIGHTS, micro_batches=MICRO)
  assert _encoder_calls(default, trainable, frozen, batches, jax.random.key(0)) == 3
