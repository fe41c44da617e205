"""model.attention: every implementation this CPU can run equals the reference
(`layers.dot_product_attention`, einsum + float32 softmax) under each mask the
models build (causal, left padding, sliding window, grouped KV heads, the
image-causal cross-attention mask with its zeroed rows); `auto` picks per
backend; a kernel for another backend is a one-line ConfigError."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.config import FlamingoConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset, model_config
from flamingo_jax.errors import ConfigError
from flamingo_jax.models import layers, masking
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.lm import default_positions, sequence_mask

B, L, H, HKV, DH = 2, 16, 4, 2, 8


def qkv(seed=0, lk=L, hkv=HKV):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, L, H, DH)).astype(np.float32)
  k = rng.normal(size=(B, lk, hkv, DH)).astype(np.float32)
  v = rng.normal(size=(B, lk, hkv, DH)).astype(np.float32)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def self_masks():
  padding = np.ones((B, L), np.int32)
  padding[1, :5] = 0  # left padding
  out = {}
  for name, attention_mask, window in [("causal", None, 0), ("padding", padding, 0),
                                       ("sliding_window", padding, 4)]:
    am = None if attention_mask is None else jnp.asarray(attention_mask)
    positions = default_positions(am, B, L)
    out[name] = (sequence_mask(am, positions, window), padding if am is not None else None)
  return out


@pytest.mark.parametrize("mask_name", ["causal", "padding", "sliding_window"])
@pytest.mark.parametrize("impl", [None, "xla"])
def test_jax_dot_product_attention_equals_reference_self(mask_name, impl):
  q, k, v = qkv()
  mask, padding = self_masks()[mask_name]
  assert not bool(jnp.all(mask))  # the mask does something
  want = layers.dot_product_attention(q, k, v, mask)
  got = layers.fused_attention(q, k, v, mask, implementation=impl)
  rows = np.ones((B, L), bool) if padding is None else padding.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], rtol=1e-5,
                             atol=1e-5)
  # the dispatcher's xla path is the reference itself
  np.testing.assert_array_equal(layers.attention(q, k, v, mask, implementation="xla"), want)


@pytest.mark.parametrize("impl", [None, "xla"])
@pytest.mark.parametrize("attend_previous", ["last", "all"])
def test_jax_dot_product_attention_equals_reference_cross(impl, attend_previous):
  """The image-causal mask [B, L, N*n] with rows that see no image zeroed."""
  n_img, n_tok = 3, 4
  q, k, v = qkv(1, lk=n_img * n_tok, hkv=H)
  tokens = np.full((B, L), 5)
  tokens[0, [2, 9]] = 7
  tokens[1, [0, 4, 12]] = 7
  phi = masking.phi(jnp.asarray(tokens), 7)
  mask = masking.visual_attention_mask(phi, n_img, n_tok, attend_previous)[:, None]
  zero_rows = ~(phi > 0)[:, None, :, None]
  want = layers.dot_product_attention(q, k, v, mask, zero_rows=zero_rows)
  got = layers.fused_attention(q, k, v, mask, zero_rows, implementation=impl)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(want[0, :2]).max()) == 0  # text before the first image


def test_auto_picks_per_backend_and_wrong_backend_is_a_config_error():
  assert layers.resolve_attention("auto", "cpu") == "xla"
  assert layers.resolve_attention("auto", "gpu") == "cudnn"
  assert layers.resolve_attention("auto", "tpu") == "splash"
  assert layers.resolve_attention("auto") == ("xla" if jax.default_backend() == "cpu" else
                                              layers.resolve_attention("auto"))
  assert layers.resolve_attention("cudnn", "gpu") == "cudnn"
  for name, backend in [("cudnn", "cpu"), ("splash", "cpu"), ("cudnn", "tpu"),
                        ("splash", "gpu")]:
    with pytest.raises(ConfigError, match="model.attention") as e:
      layers.resolve_attention(name, backend)
    assert "\n" not in str(e.value)


def tiny(attention, scan=False, window=0):
  return model_config(FlamingoConfig(
      vision=VisionConfig(name="none"), vision_feature_dim=16,
      resampler=ResamplerConfig(depth=1, width=16, num_heads=2, head_dim=8, num_latents=3,
                                max_frames=1),
      xattn=XAttnConfig(every=1, num_heads=4, head_dim=8),
      lm=lm_preset("llama", vocab_size=64, num_layers=2, width=32, num_heads=4, head_dim=8,
                   num_kv_heads=2, ffw_dim=48, sliding_window=window),
      image_token_id=61, eoc_token_id=62, attention=attention, scan_layers=scan))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU refusal")
@pytest.mark.parametrize("name", ["cudnn", "splash"])
def test_requesting_a_gpu_or_tpu_kernel_on_cpu_names_the_key(name):
  tokens = jnp.ones((1, 4), jnp.int32)
  for scan in (False, True):
    with pytest.raises(ConfigError, match=f"'model.attention' is '{name}'"):
      Flamingo(tiny(name, scan)).init(jax.random.key(0), tokens)


def test_auto_model_equals_xla_model():
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 60, (2, 8)))
  config = tiny("xla", window=3)
  params = Flamingo(config).init(jax.random.key(0), tokens)["params"]
  want, _ = Flamingo(config).apply({"params": params}, tokens)
  got, _ = Flamingo(dataclasses.replace(config, attention="auto")).apply({"params": params},
                                                                         tokens)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [0, 16])
def test_splash_kernel_in_interpret_mode_equals_reference(window):
  """The TPU kernel's own code, run by Pallas' interpreter: causal + left padding
  (segment ids) + sliding window (LocalMask), grouped KV heads, one 128 block."""
  pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
  length, dh = 128, 128
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(B, length, 2, dh)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, length, 1, dh)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, length, 1, dh)), jnp.float32)
  padding = np.ones((B, length), np.int32)
  padding[1, :20] = 0
  am = jnp.asarray(padding)
  mask = sequence_mask(am, default_positions(am, B, length), window)
  want = layers.dot_product_attention(q, k, v, mask)
  valid = jnp.diagonal(mask[:, 0], axis1=-2, axis2=-1)
  got = layers.splash_self_attention(q, k, v, valid, window, interpret=True)
  rows = padding.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], rtol=1e-5,
                             atol=1e-5)
