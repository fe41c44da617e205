"""The Flamingo model core: init equals the frozen LM, causality, gradients, options."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.config import model_config
from flamingo_jax.models import labels as labels_lib
from flamingo_jax.models.config import xattn_layer_indices
from flamingo_jax.models.flamingo import Flamingo, merged_lm_params
from flamingo_jax.models.lm import DecoderLM
from flamingo_jax.models.resampler import interpolate_temporal
from flamingo_jax.models.xattn import tanh_gates

IMG, EOC = 510, 511


def tokens_with_images():
  return jnp.array([
      [1, 5, 6, EOC, IMG, 7, 8, 9, EOC, IMG, 10, 11],
      [1, IMG, 12, 13, 14, EOC, IMG, IMG, 15, 16, 17, EOC],
  ], jnp.int32)


class Jitted:
  """The model with a jitted apply (eager linen apply is slow on CPU).

  Input validation needs concrete values, so tests of bad input use
  `.module.apply` directly.
  """

  def __init__(self, config):
    self.module = Flamingo(config)
    self.apply = jax.jit(self.module.apply, static_argnames=("train",))


def init(config, tokens, visual, **kw):
  model = Jitted(config)
  params = jax.jit(lambda t, v: nn.unbox(model.module.init(jax.random.key(0), t, **v, **kw)
                                         ["params"]))(tokens, visual)
  return model, params


def set_gates(params, value):
  out = dict(params)
  for k, v in params.items():
    if k.startswith("xattn_block_"):
      out[k] = dict(v, attn_gate=jnp.full_like(v["attn_gate"], value),
                    ffw_gate=jnp.full_like(v["ffw_gate"], value))
  return out


def random_images(seed=0, b=2, n=3, t=1):
  return jax.random.normal(jax.random.key(seed), (b, n, t, 32, 32, 3))


@pytest.mark.parametrize("no_image", ["zero_attention", "zero_output", "skip"])
def test_at_init_flamingo_equals_frozen_lm(tiny_config, no_image):
  config = dataclasses.replace(tiny_config,
                               xattn=dataclasses.replace(tiny_config.xattn, no_image=no_image))
  tokens = tokens_with_images()
  images = random_images()
  model, params = init(config, tokens, dict(images=images))
  logits, _ = model.apply({"params": params}, tokens, images=images,
                          next_image=jnp.array([False, True]))
  lm_logits = jax.jit(DecoderLM(config.lm).apply)({"params": merged_lm_params(params, config)}, tokens)
  np.testing.assert_allclose(logits, lm_logits, atol=1e-5, rtol=1e-5)
  # ... and the images matter once the gates open.
  opened, _ = model.apply({"params": set_gates(params, 0.5)}, tokens, images=images)
  assert np.abs(np.asarray(opened) - np.asarray(lm_logits)).max() > 1e-3


def test_untied_lm_new_rows_are_separate(tiny_config):
  config = dataclasses.replace(tiny_config, lm=dataclasses.replace(tiny_config.lm,
                                                                   tie_embeddings=False))
  tokens = tokens_with_images()
  images = random_images()
  model, params = init(config, tokens, dict(images=images))
  assert "new_token_unembeddings" in params
  logits, _ = model.apply({"params": params}, tokens, images=images)
  lm_logits = jax.jit(DecoderLM(config.lm).apply)({"params": merged_lm_params(params, config)}, tokens)
  np.testing.assert_allclose(logits, lm_logits, atol=1e-5, rtol=1e-5)


def test_text_only_input(tiny_config):
  tokens = jnp.array([[1, 2, 3, 4, 5]])
  model, params = init(tiny_config, tokens_with_images(), dict(images=random_images()))
  logits, _ = model.apply({"params": set_gates(params, 0.5)}, tokens)
  assert logits.shape == (1, 5, tiny_config.lm.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()


def test_image_causality(tiny_config):
  """Changing image 2 changes nothing before its <image> token (previous-image mode)."""
  tokens = tokens_with_images()[:1]
  images = random_images(b=1, n=2)
  model, params = init(tiny_config, tokens, dict(images=images))
  params = set_gates(params, 0.7)
  base, _ = model.apply({"params": params}, tokens, images=images)
  changed = images.at[:, 1].set(jax.random.normal(jax.random.key(9), images[:, 1].shape))
  out, _ = model.apply({"params": params}, tokens, images=changed)
  pos_image2 = int(np.where(np.asarray(tokens[0]) == IMG)[0][1])
  diff = np.abs(np.asarray(out - base))[0].max(-1)
  assert diff[:pos_image2].max() < 1e-6
  assert diff[pos_image2:].min() > 1e-5
  # In next-image mode the text before image 2's token does see image 2.
  nxt = jnp.array([True])
  base_n, _ = model.apply({"params": params}, tokens, images=images, next_image=nxt)
  out_n, _ = model.apply({"params": params}, tokens, images=changed, next_image=nxt)
  diff_n = np.abs(np.asarray(out_n - base_n))[0].max(-1)
  pos_image1 = int(np.where(np.asarray(tokens[0]) == IMG)[0][0])
  assert diff_n[:pos_image1 + 1].max() < 1e-6
  assert diff_n[pos_image1 + 1:pos_image2].min() > 1e-5


def test_skip_policy_text_before_first_image_is_pure_lm(tiny_config):
  config = dataclasses.replace(tiny_config,
                               xattn=dataclasses.replace(tiny_config.xattn, no_image="skip"))
  tokens = tokens_with_images()
  images = random_images()
  model, params = init(config, tokens, dict(images=images))
  logits, _ = model.apply({"params": set_gates(params, 0.9)}, tokens, images=images)
  lm_logits = jax.jit(DecoderLM(config.lm).apply)({"params": merged_lm_params(params, config)}, tokens)
  first = int(np.where(np.asarray(tokens[0]) == IMG)[0][0])
  np.testing.assert_allclose(logits[0, :first], lm_logits[0, :first], atol=1e-5)


def test_gradients_reach_only_trainable_leaves(tiny_config):
  tokens = tokens_with_images()
  images = random_images()
  model, params = init(tiny_config, tokens, dict(images=images))
  params = set_gates(params, 0.5)
  labels = labels_lib.param_labels(params, tiny_config)
  trainable, frozen = labels_lib.partition(params, labels)
  assert all(k[0] in ("vision", "lm") for k in frozen)
  assert {k[0] for k in trainable} >= {"resampler", "new_token_embeddings", "xattn_block_0"}

  def loss(tr):
    logits, _ = model.apply({"params": labels_lib.merge(tr, frozen)}, tokens, images=images)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  grads = jax.jit(jax.grad(loss))(trainable)
  assert set(grads) == set(trainable)
  for path, g in grads.items():
    assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {path}"
  # The frozen vision encoder's output is stop-gradiented, so even a full-tree
  # gradient spends nothing on it.
  full = jax.jit(jax.grad(
      lambda p: jnp.mean(model.apply({"params": p}, tokens, images=images)[0])))(params)
  assert all(np.abs(np.asarray(x)).max() == 0 for x in jax.tree.leaves(full["vision"]))


def test_labels_resampler_has_no_decay(tiny_config):
  tokens = tokens_with_images()
  _, params = init(tiny_config, tokens, dict(images=random_images()))
  counts = labels_lib.count_by_label(params, tiny_config)
  labels = labels_lib.param_labels(params, tiny_config)
  assert set(jax.tree.leaves(labels["resampler"])) == {labels_lib.TRAINABLE_NO_DECAY}
  assert set(jax.tree.leaves(labels["xattn_block_0"])) == {labels_lib.TRAINABLE}
  assert set(jax.tree.leaves(labels["lm"])) == {labels_lib.FROZEN}
  assert counts[labels_lib.FROZEN] > 0
  unfrozen = dataclasses.replace(tiny_config, frozen=("vision",))
  assert set(jax.tree.leaves(labels_lib.param_labels(params, unfrozen)["lm"])) == {
      labels_lib.TRAINABLE}


def test_xattn_placement():
  assert xattn_layer_indices(40, 4, "paper") == list(range(0, 40, 4))
  assert xattn_layer_indices(80, 7, "paper") == list(range(0, 78, 7))
  assert len(xattn_layer_indices(80, 7, "paper")) == 12
  assert xattn_layer_indices(8, 4, "openflamingo") == [3, 7]
  assert xattn_layer_indices(24, 1, "middle") == [12]


def test_temporal_interpolation():
  emb = jnp.arange(4.0).reshape(4, 1, 1) * jnp.ones((1, 1, 3))
  assert interpolate_temporal(emb, 2).shape == (2, 1, 3)
  np.testing.assert_allclose(interpolate_temporal(emb, 2)[:, 0, 0], [0, 1])
  up = interpolate_temporal(emb, 7)
  np.testing.assert_allclose(up[:, 0, 0], np.linspace(0, 3, 7), atol=1e-6)


@pytest.mark.parametrize("kind", ["perceiver", "mlp", "transformer"])
def test_resampler_kinds_and_video(tiny_config, kind):
  config = dataclasses.replace(tiny_config,
                               resampler=dataclasses.replace(tiny_config.resampler, kind=kind))
  tokens = tokens_with_images()
  feats = jax.random.normal(jax.random.key(1), (2, 3, 6, 16, 32))  # 6 frames > max_frames 4
  model, params = init(config, tokens, dict(visual_features=feats))
  logits, aux = model.apply({"params": set_gates(params, 0.3)}, tokens, visual_features=feats)
  assert logits.shape == (2, 12, config.lm.vocab_size)
  assert aux["resampler/num_visual_tokens"] == config.resampler.num_latents


@pytest.mark.parametrize("option", [
    dict(gating="none"), dict(gate_shape="vector"), dict(kind="vanilla"),
    dict(attend_previous="all"), dict(placement="middle"), dict(kv_layernorm=False)])
def test_xattn_ablation_options_run(tiny_config, option):
  config = dataclasses.replace(tiny_config,
                               xattn=dataclasses.replace(tiny_config.xattn, **option))
  tokens = tokens_with_images()
  images = random_images()
  model, params = init(config, tokens, dict(images=images))
  logits, _ = model.apply({"params": params}, tokens, images=images)
  assert np.isfinite(np.asarray(logits)).all()
  gates = tanh_gates(params)
  if option.get("gating") == "none":
    assert gates == {}
  elif option.get("kind") == "vanilla":
    assert all(k.endswith("attn_gate") for k in gates)
  else:
    assert all(float(v) == 0.0 for v in gates.values()) and gates


def test_bfloat16_compute(tiny_config):
  config = dataclasses.replace(tiny_config, dtype="bfloat16")
  tokens = tokens_with_images()
  images = random_images()
  model, params = init(config, tokens, dict(images=images))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits, _ = model.apply({"params": params}, tokens, images=images)
  f32, _ = jax.jit(Flamingo(tiny_config).apply)({"params": params}, tokens, images=images)
  assert logits.dtype == jnp.float32
  assert np.abs(np.asarray(logits - f32)).max() < 0.1


def test_jit_and_remat(tiny_config):
  config = dataclasses.replace(tiny_config, remat="block")
  tokens = tokens_with_images()
  images = random_images()
  model, params = init(config, tokens, dict(images=images))
  f = jax.jit(lambda p: model.module.apply({"params": p}, tokens, images=images)[0].sum())
  g = jax.jit(jax.grad(lambda p: model.module.apply({"params": p}, tokens, images=images)[0].sum()))
  assert np.isfinite(float(f(params)))
  assert jax.tree.structure(g(params)) == jax.tree.structure(params)


# ---------------------------------------------------------------- bad input


def test_more_image_tokens_than_images(tiny_config):
  tokens = tokens_with_images()
  model, params = init(tiny_config, tokens, dict(images=random_images()))
  with pytest.raises(ValueError, match=r"example 1 has 3 <image> tokens .* only 2 image slots"):
    model.module.apply({"params": params}, tokens, images=random_images(n=2))
  with pytest.raises(ValueError, match="image_count is 1 but the tokens hold 2"):
    model.module.apply({"params": params}, tokens, images=random_images(),
                image_count=jnp.array([1, 3]))
  with pytest.raises(ValueError, match="no images"):
    model.module.apply({"params": params}, tokens)


def test_feature_width_mismatch(tiny_config):
  tokens = tokens_with_images()
  feats = jnp.zeros((2, 3, 1, 16, 32))
  model, params = init(tiny_config, tokens, dict(visual_features=feats))
  with pytest.raises(ValueError, match="visual features are 48 wide but model.vision_feature_dim "
                     "is 32"):
    model.module.apply({"params": params}, tokens, visual_features=jnp.zeros((2, 3, 1, 16, 48)))


def test_bad_shapes(tiny_config):
  tokens = tokens_with_images()
  model, params = init(tiny_config, tokens, dict(images=random_images()))
  with pytest.raises(ValueError, match=r"images must have rank 6"):
    model.module.apply({"params": params}, tokens, images=jnp.zeros((2, 3, 32, 32, 3)))
  with pytest.raises(ValueError, match="batch size 1 but tokens has 2"):
    model.module.apply({"params": params}, tokens, images=random_images(b=1))
  with pytest.raises(ValueError, match="token ids must lie in"):
    model.module.apply({"params": params}, tokens.at[0, 0].set(100000), images=random_images())


def test_unknown_config_key(tiny_config):
  from flamingo_jax.config import to_config_dict
  cd = to_config_dict(tiny_config)
  cd.xattn.unlock()
  cd.xattn.gatting = "tanh"
  with pytest.raises(ValueError, match="unknown config key 'model.xattn.gatting'"):
    model_config(cd)
  cd = to_config_dict(tiny_config)
  cd.xattn.gating = "sigmoid"
  with pytest.raises(ValueError, match="'model.xattn.gating' is 'sigmoid'"):
    model_config(cd)
  cd = to_config_dict(tiny_config)
  cd.lm.num_kv_heads = 3
  with pytest.raises(ValueError, match="num_kv_heads"):
    model_config(cd)
  with pytest.raises(ValueError, match="'model.lm.width' must be int"):
    model_config({"lm": {"width": "wide"}})
