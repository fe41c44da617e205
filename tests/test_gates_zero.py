"""With every gate at 0, Flamingo is exactly its frozen LM (with the trained
`<image>` / `<EOC>` rows written in), for every LM family and for the IDEFICS
configuration: images and the cross-attention change nothing, and the new-token
rows replace only the token embedding (GPT-2's learned position is still added
at `<image>` / `<EOC>`)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.config import FlamingoConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset, model_config
from flamingo_jax.models.flamingo import Flamingo, merged_lm_config, merged_lm_params
from flamingo_jax.models.lm import DecoderLM
from random_weights import random_params

V, IMG, EOC, RESET = 64, 61, 62, 2
SIZES = dict(vocab_size=V, num_layers=4, width=32, num_heads=4, head_dim=8, ffw_dim=48)
LMS = {
    "chinchilla": lm_preset("chinchilla", **SIZES),
    "llama": lm_preset("llama", **SIZES, num_kv_heads=2, sliding_window=5),
    "gpt2": lm_preset("gpt2", **SIZES, max_length=32),
    "gpt_neox": lm_preset("gpt_neox", **SIZES, rotary_dim=4),
    "mpt": lm_preset("mpt", **SIZES, qk_norm=True),
    "qwen2": lm_preset("qwen2", **SIZES, rope_scaling="llama3", rope_scaling_factor=8.0,
                       rope_original_max_length=8),
    "gemma": lm_preset("gemma", **SIZES, embedding_scale=32 ** 0.5),
    # A pretrained LM without rows for <image> / <EOC> (configs/from_hf_lm.py).
    "llama_grown_vocab": lm_preset("llama", **{**SIZES, "vocab_size": EOC + 1},
                                   embedding_rows=IMG),
}


def idefics_config() -> FlamingoConfig:
  """The converter's config of a tiny IDEFICS: paper placement, RMSNorm / SwiGLU /
  qk-norm cross-attention with vector gates and zero output without an image, and
  `</s>` (id RESET) cutting text off from its image."""
  transformers = pytest.importorskip("transformers")
  from flamingo_jax.convert.idefics import flamingo_config
  hf = transformers.IdeficsConfig(
      vocab_size=V - 2, additional_vocab_size=2, hidden_size=32, intermediate_size=48,
      num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=True,
      alpha_type="vector", use_resampler=True, pad_token_id=0, bos_token_id=1,
      eos_token_id=RESET,
      vision_config=dict(embed_dim=16, image_size=16, patch_size=8, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2),
      perceiver_config=dict(resampler_n_latents=3, resampler_depth=1, resampler_n_heads=2,
                            resampler_head_dim=8, qk_layer_norms_perceiver=True))
  return flamingo_config(hf.to_dict())


@functools.lru_cache(maxsize=None)
def config_of(kind: str) -> FlamingoConfig:
  if kind == "idefics":
    return idefics_config()
  return model_config(FlamingoConfig(
      vision=VisionConfig(name="none"), vision_feature_dim=16,
      resampler=ResamplerConfig(depth=1, width=16, num_heads=2, head_dim=8, num_latents=3,
                                max_frames=1),
      xattn=XAttnConfig(every=2, num_heads=2, head_dim=8), lm=LMS[kind],
      image_token_id=IMG, eoc_token_id=EOC))


def with_gates(params, value: float):
  return {k: (dict(v, attn_gate=jnp.full_like(v["attn_gate"], value),
                   ffw_gate=jnp.full_like(v["ffw_gate"], value))
              if k.startswith("xattn_block_") else v) for k, v in params.items()}


def inputs(config: FlamingoConfig):
  """Two rows with images, <EOC> and (row 1) left padding; a reset token in row 0."""
  tokens = np.array([[1, IMG, 5, 6, RESET, EOC, IMG, 7, 8, 9, EOC, 10, 11, 12],
                     [0, 0, 0, 1, IMG, 13, 14, 15, EOC, IMG, IMG, 16, 17, EOC]], np.int32)
  mask = np.ones_like(tokens)
  mask[1, :3] = 0
  feats = np.random.default_rng(1).standard_normal(
      (2, 3, 1, 4, config.vision_feature_dim)).astype(np.float32)
  return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(feats)


@pytest.mark.parametrize("kind", [*LMS, "idefics"])
def test_gates_at_zero_equal_the_frozen_lm(kind):
  config = config_of(kind)
  model = Flamingo(config)
  tokens, mask, feats = inputs(config)
  params = random_params(model, tokens, None, feats, scale=0.3)
  assert params["lm"]["embedding"].shape[0] == (config.lm.embedding_rows
                                                or config.lm.vocab_size)
  apply = jax.jit(lambda p, t, a, f: model.apply({"params": p}, t, visual_features=f,
                                                 attention_mask=a)[0])
  closed = np.asarray(apply(with_gates(params, 0.0), tokens, mask, feats))
  lm = jax.jit(DecoderLM(merged_lm_config(config)).apply)
  want = np.asarray(lm({"params": merged_lm_params(params, config)}, tokens, mask))
  real = np.asarray(mask, bool)
  assert np.abs(closed[real] - want[real]).max() < 1e-5
  # The test can fail: opened gates make the images count.
  opened = np.asarray(apply(with_gates(params, 0.5), tokens, mask, feats))
  assert np.abs(opened[real] - want[real]).max() > 1e-2


def test_new_token_rows_keep_gpt2_positions():
  """At `<image>` / `<EOC>` the input is the trainable row plus GPT-2's position
  embedding (the bug this guards against dropped the position there)."""
  config = config_of("gpt2")
  model = Flamingo(config)
  tokens, mask, feats = inputs(config)
  params = random_params(model, tokens, None, feats, scale=0.3)
  positions = np.maximum(np.cumsum(np.asarray(mask), -1) - 1, 0)
  got = np.asarray(model.apply({"params": params}, tokens, jnp.asarray(positions),
                               method="embed_tokens"))
  pos_table = np.asarray(params["lm"]["position_embedding"])
  for k, tid in enumerate((IMG, EOC)):
    at = np.asarray(tokens) == tid
    want = np.asarray(params["new_token_embeddings"][k]) + pos_table[positions[at]]
    np.testing.assert_allclose(got[at], want, atol=1e-6)
