"""model.attention='blocked': the LM's causal self-attention by query blocks equals the
reference (`layers.dot_product_attention`) on every real row, forward and backward, under
the masks the LM builds (causal, left padding, sliding window, grouped KV heads), and a
model with it equals the xla model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.config import FlamingoConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset, model_config
from flamingo_jax.models import layers
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.lm import default_positions, sequence_mask

B, L, H, HKV, DH = 2, 16, 4, 2, 8


def _inputs(window, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(B, L, h, DH)), jnp.float32) for h in (H, HKV, HKV))
  padding = np.ones((B, L), np.int32)
  padding[1, :5] = 0  # left padding: rows 0-4 of example 1 attend to nothing
  am = jnp.asarray(padding)
  return q, k, v, sequence_mask(am, default_positions(am, B, L), window), padding.astype(bool)


@pytest.mark.parametrize("block", [4, 5])  # 4 even blocks; 5, 5, 5 and 1
@pytest.mark.parametrize("window", [0, 3])
def test_blocked_equals_reference_forward_and_backward(block, window):
  q, k, v, mask, rows = _inputs(window)
  want = layers.dot_product_attention(q, k, v, mask)
  got = layers.blocked_causal_attention(q, k, v, mask, block)
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(
      layers.attention(q, k, v, mask, implementation="blocked", causal_self=True),
      layers.blocked_causal_attention(q, k, v, mask))
  # non-causal calls (cross-attention) run the reference
  np.testing.assert_array_equal(layers.attention(q, k, v, mask, implementation="blocked"), want)

  weights = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), jnp.float32)
  weights = weights * jnp.asarray(rows, jnp.float32)[:, :, None, None]  # the loss sees real rows

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

  ref = jax.grad(loss(lambda *a: layers.dot_product_attention(*a, mask)), (0, 1, 2))(q, k, v)
  blk = jax.grad(loss(lambda *a: layers.blocked_causal_attention(*a, mask, block)),
                 (0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", blk, ref):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)
  assert float(jnp.abs(ref[1]).max()) > 0


@pytest.mark.slow
def test_blocked_model_equals_xla_model(monkeypatch):
  monkeypatch.setattr(layers, "CAUSAL_BLOCK", 3)  # 8 tokens: blocks of 3, 3 and 2
  config = model_config(FlamingoConfig(
      vision=VisionConfig(name="none"), vision_feature_dim=16,
      resampler=ResamplerConfig(depth=1, width=16, num_heads=2, head_dim=8, num_latents=3,
                                max_frames=1),
      xattn=XAttnConfig(every=1, num_heads=4, head_dim=8),
      lm=lm_preset("llama", vocab_size=64, num_layers=2, width=32, num_heads=4, head_dim=8,
                   num_kv_heads=2, ffw_dim=48),
      image_token_id=61, eoc_token_id=62, attention="xla"))
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 60, (2, 8)))
  params = Flamingo(config).init(jax.random.key(0), tokens)["params"]

  def loss(p, attention):
    logits, _ = Flamingo(dataclasses.replace(config, attention=attention)).apply(
        {"params": p}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params, "xla")
  (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(params, "blocked")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
