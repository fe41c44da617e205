"""The whole Llama 3.2 Vision model with images: transformers'
MllamaForConditionalGeneration (tiny, random weights) on pixel_values with
aspect-ratio ids and masks equals our converted model on the same tiles (the
prompts of tests/test_mllama_text_parity.py: 0, 1 and 3 images, a group, text
before the first image, padded tiles and image slots, a text-only row), and so
does cached greedy decoding."""
import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_mllama_text_parity import (TILES, V, batch, converted, cross_mask, diff,  # noqa: E402
                                     hf_model, tile_mask)

from flamingo_jax.models.flamingo import Flamingo  # noqa: E402

SIZE, TOL = 28, 1e-4
LAYOUT_ID = {1: 1, 2: 2, 3: 3, 4: 6}  # tiles -> aspect_ratio_id (1x1, 1x2, 1x3, 2x2)


def images(tiles, n=3, seed=2):
  """pixel_values [B, N, T, 3, H, W], aspect_ratio_ids [B, N], aspect_ratio_mask [B, N, T]
  as MllamaImageProcessor pads them (zeros, id 0, tile 0 marked real)."""
  rng = np.random.default_rng(seed)
  b = len(tiles)
  pixels = np.zeros((b, n, TILES, 3, SIZE, SIZE), np.float32)
  ids = np.zeros((b, n), np.int64)
  for r, row in enumerate(tiles):
    for i, t in enumerate(row):
      pixels[r, i, :t] = rng.normal(size=(t, 3, SIZE, SIZE))
      ids[r, i] = LAYOUT_ID[t]
  mask = tile_mask(tiles, n).astype(np.int64)
  mask[..., 0] = 1
  return pixels, ids, mask


def hf_logits(ids, mask, tiles):
  pixels, ar_ids, ar_mask = images(tiles)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return hf_model()(
        input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(positions), pixel_values=torch.from_numpy(pixels),
        aspect_ratio_ids=torch.from_numpy(ar_ids), aspect_ratio_mask=torch.from_numpy(ar_mask),
        cross_attention_mask=torch.from_numpy(cross_mask(ids, tiles)),
        use_cache=False).logits.numpy()


def our_inputs(tiles):
  pixels, ar_ids, _ = images(tiles)
  return dict(images=pixels.transpose(0, 1, 2, 4, 5, 3), aspect_ratio_ids=ar_ids,
              tile_mask=tile_mask(tiles))


def test_whole_model_with_images_matches_transformers():
  config, params = converted()
  assert config.vision.name == "mllama" and config.vision.image_size == SIZE
  ids, mask, _, tiles = batch()
  want = hf_logits(ids, mask, tiles)
  logits, _ = jax.jit(Flamingo(config).apply)({"params": params}, ids, attention_mask=mask,
                                               **our_inputs(tiles))
  err = diff(np.asarray(logits), want, mask)
  print(f"mllama whole-model parity (images): max abs logit diff {err:.2e}")
  assert err < TOL


def test_greedy_decoding_with_cached_cross_kv_matches_transformers():
  """prefill (cross-attention K/V of every image computed once) + greedy steps give
  transformers' greedy tokens and logits on the same prompts (run without a cache
  there, one full forward per step)."""
  config, params = converted()
  ids, mask, _, tiles = batch()
  model = Flamingo(config)
  steps = 3
  prefill = jax.jit(functools.partial(model.apply, method="prefill",
                                      cache_length=ids.shape[1] + steps))
  extend = jax.jit(functools.partial(model.apply, method="extend"))
  variables = {"params": params}
  # left-pad every row to the same end, as decoding requires
  logits, cache = prefill(variables, ids, attention_mask=mask, **our_inputs(tiles))
  seq, seq_mask = ids, mask
  for _ in range(steps):
    want = hf_logits(seq, seq_mask, tiles)[:, -1]
    got = np.asarray(logits)[:, -1, :V]
    assert np.abs(got - want).max() < TOL
    token = got.argmax(-1)
    assert (token == want.argmax(-1)).all()
    seq = np.concatenate([seq, token[:, None]], axis=1)
    seq_mask = np.concatenate([seq_mask, np.ones_like(token)[:, None]], axis=1)
    logits, cache = extend(variables, token[:, None], cache)
