"""Adaptive gradient clipping against hand-computed numbers."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flamingo_jax.training.agc import adaptive_grad_clip, unitwise_norm


def _update(params, grads, **kwargs):
  tx = adaptive_grad_clip(**kwargs)
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree.map(np.asarray, updates)


def test_dense_clips_each_output_unit():
  # Columns are units. |W_0| = 5, |W_1| = 1e-4 -> floored to eps = 1e-3.
  # clip 0.1: max norms 0.5 and 1e-4; both gradient columns have norm 1.
  p = np.array([[3.0, 0.0], [4.0, 1e-4]], np.float32)
  g = np.array([[0.6, 1.0], [0.8, 0.0]], np.float32)
  out = _update({"w": p}, {"w": g}, clip=0.1, eps=1e-3)["w"]
  np.testing.assert_allclose(out, [[0.3, 1e-4], [0.4, 0.0]], rtol=1e-6)


def test_unit_below_threshold_is_untouched():
  p = np.array([[3.0, 3.0], [4.0, 4.0]], np.float32)  # max norm 0.5 per column
  g = np.array([[0.03, 3.0], [0.04, 4.0]], np.float32)  # norms 0.05 (kept), 5 (x0.1)
  out = _update({"w": p}, {"w": g}, clip=0.1)["w"]
  np.testing.assert_array_equal(out[:, 0], g[:, 0])
  np.testing.assert_allclose(out[:, 1], [0.3, 0.4], rtol=1e-6)


def test_conv_kernel_unit_is_output_channel():
  # [kh=1, kw=1, in=3, out=2]: unit 0 = (1, 2, 2), norm 3; unit 1 = 0 -> eps.
  p = np.zeros((1, 1, 3, 2), np.float32)
  p[0, 0, :, 0] = [1.0, 2.0, 2.0]
  g = np.zeros((1, 1, 3, 2), np.float32)
  g[0, 0, :, 0] = [0.02, 0.04, 0.04]  # norm 0.06 > 0.01 * 3 -> scaled by 0.5
  g[0, 0, :, 1] = [3e-6, 4e-6, 0.0]  # norm 5e-6 < 0.01 * 1e-3 -> kept
  out = _update({"k": p}, {"k": g}, clip=0.01, eps=1e-3)["k"]
  np.testing.assert_allclose(out[0, 0, :, 0], [0.01, 0.02, 0.02], rtol=1e-6)
  np.testing.assert_array_equal(out[0, 0, :, 1], g[0, 0, :, 1])


def test_vectors_and_scalars_use_the_whole_tensor():
  params = {"bias": np.array([3.0, 4.0], np.float32), "skip_gain": np.array(0.0, np.float32),
            "row": np.array([[3.0, 4.0]], np.float32)}  # [1, 2] squeezes to a vector
  grads = {"bias": np.array([3.0, 4.0], np.float32), "skip_gain": np.array(1.0, np.float32),
           "row": np.array([[3.0, 4.0]], np.float32)}
  out = _update(params, grads, clip=0.1, eps=1e-3)
  np.testing.assert_allclose(out["bias"], [0.3, 0.4], rtol=1e-6)  # 0.1 * 5 / 5
  np.testing.assert_allclose(out["skip_gain"], 1e-4, rtol=1e-6)  # 0.1 * eps / 1
  np.testing.assert_allclose(out["row"], [[0.3, 0.4]], rtol=1e-6)


def test_unitwise_norm_shapes():
  assert unitwise_norm(jnp.ones((3, 3, 4, 8))).shape == (1, 1, 1, 8)
  assert unitwise_norm(jnp.ones((4, 8))).shape == (1, 8)
  assert unitwise_norm(jnp.ones((4, 2, 8))).shape == (1, 2, 8)
  assert unitwise_norm(jnp.ones((8,))).shape == ()
  np.testing.assert_allclose(unitwise_norm(jnp.ones((3, 3, 4, 8))), 6.0)


def test_classifier_excluded_by_default():
  big = np.full((4, 3), 10.0, np.float32)
  params = {"classifier": {"kernel": np.ones((4, 3), np.float32)},
            "vision": {"classifier": {"bias": np.ones((3,), np.float32)}},
            "my_classifier_head": {"kernel": np.ones((4, 3), np.float32)}}
  grads = {"classifier": {"kernel": big}, "vision": {"classifier": {"bias": big[0]}},
           "my_classifier_head": {"kernel": big}}
  out = _update(params, grads)
  np.testing.assert_array_equal(out["classifier"]["kernel"], big)
  np.testing.assert_array_equal(out["vision"]["classifier"]["bias"], big[0])
  # Not a 'classifier' path component: clipped to 0.01 * 2 per column.
  np.testing.assert_allclose(np.linalg.norm(out["my_classifier_head"]["kernel"], axis=0), 0.02,
                             rtol=1e-5)


def test_exclude_regex_predicate_and_none():
  params = {"a": np.ones((2,), np.float32), "b": np.ones((2,), np.float32)}
  grads = {"a": np.full((2,), 5.0, np.float32), "b": np.full((2,), 5.0, np.float32)}
  by_regex = _update(params, grads, exclude=r"^a$")
  by_pattern = _update(params, grads, exclude=re.compile("b"))
  by_predicate = _update(params, grads, exclude=lambda path, p: path == "b")
  clipped = 0.01 * np.sqrt(2) / np.sqrt(50) * 5.0
  np.testing.assert_array_equal(by_regex["a"], grads["a"])
  np.testing.assert_allclose(by_regex["b"], clipped, rtol=1e-6)
  np.testing.assert_array_equal(by_pattern["b"], grads["b"])
  np.testing.assert_array_equal(by_predicate["b"], grads["b"])
  np.testing.assert_allclose(by_predicate["a"], clipped, rtol=1e-6)
  np.testing.assert_allclose(_update(params, grads, exclude=None)["a"], clipped, rtol=1e-6)


def test_chain_under_jit():
  params = {"w": jnp.array([[3.0], [4.0]])}
  grads = {"w": jnp.array([[6.0], [8.0]])}
  tx = optax.chain(adaptive_grad_clip(clip=0.1), optax.sgd(1.0))
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  updates, _ = step(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [[-0.3], [-0.4]], rtol=1e-6)


def test_bfloat16_gradients_keep_their_dtype():
  p = {"w": jnp.ones((2, 2), jnp.float32)}
  g = {"w": jnp.full((2, 2), 4.0, jnp.bfloat16)}
  out = _update(p, g)["w"]
  assert out.dtype == jnp.bfloat16
  # column norm 4 sqrt(2) -> 0.01 * sqrt(2): each entry 4 -> 0.01
  np.testing.assert_allclose(np.asarray(out, np.float32), 0.01, rtol=1e-2)


def test_bad_inputs_raise_value_error():
  with pytest.raises(ValueError, match="clip must be positive"):
    adaptive_grad_clip(clip=0.0)
  with pytest.raises(ValueError, match="eps must be positive"):
    adaptive_grad_clip(eps=-1.0)
  with pytest.raises(ValueError, match="exclude regex"):
    adaptive_grad_clip(exclude="(")
  with pytest.raises(ValueError, match="exclude must be"):
    adaptive_grad_clip(exclude=3)
  tx = adaptive_grad_clip()
  with pytest.raises(ValueError, match="needs params"):
    tx.update({"w": jnp.ones(2)}, tx.init(None))
  with pytest.raises(ValueError, match=r"'w' of shape \(1, 1, 1, 2, 2\)"):
    tx.update({"w": jnp.ones((1, 1, 1, 2, 2))}, tx.init(None), {"w": jnp.ones((1, 1, 1, 2, 2))})
  with pytest.raises(ValueError, match="'w' has shape"):
    tx.update({"w": jnp.ones((2, 3))}, tx.init(None), {"w": jnp.ones((3, 2))})
