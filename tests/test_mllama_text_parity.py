"""Llama 3.2 Vision's language side (transformers' MllamaForConditionalGeneration,
built locally from a tiny MllamaConfig with random weights) gives the same logits
through our converter, on the projector's input (precomputed vision features):
prompts with 0, 1 and 3 images, text before the first image, a run of two
consecutive `<|image|>` tokens (one group), an image before BOS (the processor's
quirk), padded tiles, left padding and a text-only row batched with image rows;
the cross_attention_mask is the one MllamaProcessor's functions build. Both row
masks: transformers' (FFW output only) equals transformers; Meta's (attention
and FFW output) equals transformers with its attention output multiplied by the
row mask, as Meta's code does; the two differ exactly where a token has no image.
Each feature is shown to matter (dropping it breaks parity)."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flamingo_jax.convert.mllama import convert_mllama, flamingo_config  # noqa: E402
from flamingo_jax.errors import CheckpointError, ConfigError  # noqa: E402
from flamingo_jax.models import layer_stack  # noqa: E402
from flamingo_jax.models.config import mllama_layer_indices  # noqa: E402
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402

V = 100  # text vocabulary; <|image|> = V, the first of 8 extra embedding rows
IMG, PAD, BOS, EOS = V, 0, 1, 2
TILES, PATCHES, C = 4, 5, 48  # max tiles, tokens per tile (28 px / 14 + CLS), vision_output_dim
CROSS = [1, 4, 6]  # in HF's merged list of 8 layers -> before our LM blocks 1, 3, 4
TOL = 1e-4


def hf_config():
  from transformers import MllamaConfig
  text = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, num_hidden_layers=8, cross_attention_layers=CROSS,
              rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=BOS,
              eos_token_id=EOS, pad_token_id=PAD,
              rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8))
  vision = dict(hidden_size=16, attention_heads=2, intermediate_size=32, num_hidden_layers=2,
                num_global_layers=1, image_size=28, patch_size=14,
                intermediate_layers_indices=[0, 1], vision_output_dim=C, max_num_tiles=TILES)
  return MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMG)


@functools.lru_cache(maxsize=1)
def hf_model():
  """An eval-mode float32 mllama whose every weight is O(1) random (gates and norm
  scales too, so the cross-attention counts and a misplaced tensor shows)."""
  from transformers import MllamaForConditionalGeneration
  torch.manual_seed(0)
  model = MllamaForConditionalGeneration(hf_config()).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("_gate"):
        p.copy_(torch.randn(p.shape))
      elif p.ndim >= 2:
        p.copy_(torch.randn(p.shape) / np.sqrt(p.shape[-1]))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape))
      else:
        p.copy_(1 + 0.1 * torch.randn(p.shape))
  return model


def batch():
  """(ids [4, L], attention_mask [4, L], features [4, 3, T, P, C], num_tiles per row).

  Row 0: text, a group of two images, text, a third image, text (3 images).
  Row 1: left padding, one image after text, 2 of its 4 tiles real.
  Row 2: text only, batched with the image rows.
  Row 3: the processor's quirk: `<|image|>` before BOS, 3 tiles.
  """
  rows = [[BOS, 5, 6, IMG, IMG, 7, 8, 9, IMG, 10, 11, 12],
          [PAD, PAD, BOS, 5, IMG, 20, 21, 22, 23, 24, 25, 26],
          [BOS, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40],
          [IMG, BOS, 41, 42, 43, 44, 45, 46, 47, 48, 49, EOS]]
  tiles = [[4, 1, 2], [2], [], [3]]
  ids = np.array(rows, np.int64)
  mask = (ids != PAD).astype(np.int64)
  features = np.random.default_rng(1).normal(size=(4, 3, TILES, PATCHES, C)).astype(np.float32)
  return ids, mask, features, tiles


def cross_mask(ids, tiles):
  """MllamaProcessor's cross_attention_mask [B, L, N, T]."""
  from transformers.models.mllama import processing_mllama as proc
  sparse = [proc.get_cross_attention_token_mask(list(row), IMG) for row in ids]
  return proc.convert_sparse_cross_attention_mask_to_dense(sparse, tiles, TILES, ids.shape[1])


def tile_mask(tiles, n=3):
  out = np.zeros((len(tiles), n, TILES), bool)
  for b, row in enumerate(tiles):
    for i, t in enumerate(row):
      out[b, i, :t] = True
  return out


def hf_logits(ids, mask, features=None, tiles=None, meta=False):
  """transformers' logits [B, L, V]; meta=True multiplies each cross-attention
  output by the row mask (Meta's CrossAttentionTransformerBlock)."""
  model = hf_model()
  kw = {}
  hooks = []
  if features is not None:
    dense = cross_mask(ids, tiles)
    with torch.no_grad():
      states = model.model.multi_modal_projector(torch.from_numpy(features))
    kw = dict(cross_attention_states=states.reshape(ids.shape[0], -1, states.shape[-1]),
              cross_attention_mask=torch.from_numpy(dense))
    if meta:
      row = torch.from_numpy(dense.any(axis=(2, 3)).astype(np.float32))[..., None]
      for layer in model.model.language_model.layers:
        if hasattr(layer, "cross_attn"):
          hooks.append(layer.cross_attn.register_forward_hook(
              lambda mod, args, out: (out[0] * row,) + tuple(out[1:])))
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  try:
    with torch.no_grad():
      out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(positions), use_cache=False, **kw)
  finally:
    for h in hooks:
      h.remove()
  return out.logits.float().numpy()


@functools.lru_cache(maxsize=None)
def converted(row_mask="transformers"):
  model = hf_model()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return convert_mllama(state, model.config.to_dict(), row_mask=row_mask)


def ours(config, params, ids, mask, features=None, tiles=None):
  kw = {} if features is None else dict(visual_features=features, tile_mask=tile_mask(tiles))
  logits, _ = jax.jit(Flamingo(config).apply)({"params": params}, ids, attention_mask=mask, **kw)
  return np.asarray(logits)


def diff(got, want, mask):
  real = mask.astype(bool)
  return np.abs(got[..., :V] - want)[real].max()


def test_layer_mapping_and_config():
  assert mllama_layer_indices(range(3, 40, 5), 32) == (3, 7, 11, 15, 19, 23, 27, 31)
  assert mllama_layer_indices(CROSS, 5) == (1, 3, 4)
  with pytest.raises(ConfigError, match="cross_attention_layers"):
    mllama_layer_indices([3, 4], 8)  # two in a row: one place
  with pytest.raises(ConfigError, match="cross_attention_layers"):
    mllama_layer_indices([8], 8)  # after the last self-attention layer
  config = flamingo_config(hf_config().to_dict())
  x = config.xattn
  assert (x.placement, x.layers, x.num_kv_heads, x.attend_previous, x.no_image) == (
      "explicit", (1, 3, 4), 2, "group", "attend_all")
  assert config.lm.vocab_size == V + 8 and config.lm.embedding_rows == V
  assert config.lm.rope_scaling == "llama3" and config.resampler.kind == "linear"


def test_logits_match_transformers_with_images():
  config, params = converted()
  ids, mask, features, tiles = batch()
  want = hf_logits(ids, mask, features, tiles)
  got = ours(config, params, ids, mask, features, tiles)
  err = diff(got, want, mask)
  print(f"mllama text-side parity (transformers row mask): max abs logit diff {err:.2e}")
  assert err < TOL
  # the head cannot emit <|image|> nor the other extra rows
  assert (got[..., V:] == np.finfo(np.float32).min).all()
  # Not vacuous: an image reaches its text from its <|image|> on (Meta's row mask;
  # transformers' lets the text before the first image see every image).
  other = features.copy()
  other[0, 1] = 0  # the group's second image
  changed = np.abs(hf_logits(ids, mask, other, tiles, meta=True)
                   - hf_logits(ids, mask, features, tiles, meta=True))[0].max(-1)
  assert changed[:4].max() < 1e-6 and changed[4:].min() > 1e-3
  assert np.abs(hf_logits(ids, mask, other, tiles) - want)[0, :3].max(-1).min() > 1e-3


def test_text_only_batch_matches_transformers():
  """No images at all: transformers skips its cross-attention layers, ours see none."""
  config, params = converted()
  ids, mask, _, _ = batch()
  ids, mask = ids[2:3], mask[2:3]
  err = diff(ours(config, params, ids, mask), hf_logits(ids, mask), mask)
  assert err < TOL


def test_meta_row_mask_and_the_difference():
  """Meta's row mask equals transformers patched the way Meta computes; it differs
  from transformers' exactly at tokens without an image (before the first image,
  the text-only row) and makes such a row the LM alone."""
  config, params = converted("meta")
  assert config.xattn.no_image == "skip"
  ids, mask, features, tiles = batch()
  want_meta = hf_logits(ids, mask, features, tiles, meta=True)
  got = ours(config, params, ids, mask, features, tiles)
  assert diff(got, want_meta, mask) < TOL
  hf = hf_logits(ids, mask, features, tiles)
  gap = np.abs(want_meta - hf).max(-1)
  assert gap[0, :3].min() > 1e-3 and gap[2].min() > 1e-3  # no image yet / none at all
  assert gap[3].max() < 1e-6  # the image is the first token: every token has it
  text_only = ours(config, params, ids[2:3], mask[2:3])
  assert np.abs(got[2] - text_only[0]).max() < TOL


def test_each_feature_matters():
  """Dropping the grouping, the tile mask or the row mask breaks parity."""
  config, params = converted()
  ids, mask, features, tiles = batch()
  want = hf_logits(ids, mask, features, tiles)
  last = dataclasses.replace(config, xattn=dataclasses.replace(config.xattn,
                                                               attend_previous="last"))
  gap = np.abs(ours(last, params, ids, mask, features, tiles)[..., :V] - want).max(-1) * mask
  assert gap[0, 4:8].min() > 1e-3 and gap[1:].max() < TOL  # the group's text only
  logits, _ = jax.jit(Flamingo(config).apply)({"params": params}, ids, attention_mask=mask,
                                               visual_features=features)
  gap = np.abs(np.asarray(logits)[..., :V] - want).max(-1) * mask
  assert gap[1, 4:].min() > 1e-3 and gap[3, :].max() > 1e-3  # padded tiles now seen
  zero = dataclasses.replace(config, xattn=dataclasses.replace(config.xattn,
                                                               no_image="zero_output"))
  gap = np.abs(ours(zero, params, ids, mask, features, tiles)[..., :V] - want).max(-1) * mask
  assert gap[2].min() > 1e-3 and gap[3].max() < TOL


def test_scanned_layers_and_cached_decoding():
  """The scanned layout (with remat) gives the same logits; prefill + one token at a time (groups
  and padded tiles carried in the cache) too."""
  config, params = converted()
  ids, mask, features, tiles = batch()
  want = hf_logits(ids, mask, features, tiles)
  scanned = dataclasses.replace(config, scan_layers=True, remat="block")
  got = ours(scanned, layer_stack.to_layout(params, scanned), ids, mask, features, tiles)
  assert diff(got, want, mask) < TOL
  model = Flamingo(config)
  prefill = jax.jit(functools.partial(model.apply, method="prefill", cache_length=ids.shape[1]))
  extend = jax.jit(functools.partial(model.apply, method="extend"))
  variables = {"params": params}
  start = 4  # the group's second <|image|> comes one token at a time
  logits, cache = prefill(variables, ids[:, :start], visual_features=features,
                          attention_mask=mask[:, :start], tile_mask=tile_mask(tiles))
  steps = [np.asarray(logits)]
  for i in range(start, ids.shape[1]):
    logits, cache = extend(variables, ids[:, i:i + 1], cache, mask[:, i:i + 1])
    steps.append(np.asarray(logits))
  assert diff(np.concatenate(steps, axis=1), want, mask) < TOL


def test_converter_errors():
  model = hf_model()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  hf = model.config.to_dict()
  missing = dict(state)
  del missing["model.language_model.layers.4.cross_attn.k_norm.weight"]
  with pytest.raises(CheckpointError,
                     match=r"missing tensor 'model\.language_model\.layers\.4\.cross_attn\.k_norm"):
    convert_mllama(missing, hf)
  extra = dict(state, **{"model.language_model.layers.4.cross_attn.extra": np.zeros(3)})
  with pytest.raises(CheckpointError,
                     match=r"'model\.language_model\.layers\.4\.cross_attn\.extra'"):
    convert_mllama(extra, hf)
  # the hub layout (language_model.model.*) converts to the same params
  old = {("language_model.model." + k[len("model.language_model."):]
          if k.startswith("model.language_model.") else
          "language_model." + k if k.startswith("lm_head.") else
          k[len("model."):]): v for k, v in state.items()}
  _, a = convert_mllama(old, hf)
  _, b = converted()
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
