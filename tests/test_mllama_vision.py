"""Llama 3.2 Vision's tiled ViT: our `mllama` vision encoder equals transformers'
MllamaVisionModel (built locally, random weights, every gate non-zero) on images of
several layouts: 4 tiles (2x2), 2 (1x2) with 2 padded tiles, 3 (1x3) and a padded
image slot (aspect_ratio_id 0), with local and gated global layers and intermediate
layers listed out of order (their channels interleave)."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flamingo_jax.convert.mllama import convert_vision, vision_config  # noqa: E402
from flamingo_jax.convert.weights_io import StateDict  # noqa: E402
from flamingo_jax.models.vision import build_vision_encoder, vision_feature_dim  # noqa: E402

TILES, SIZE, TOL = 4, 28, 1e-4
VISION = dict(hidden_size=16, attention_heads=2, intermediate_size=32, num_hidden_layers=3,
              num_global_layers=2, image_size=SIZE, patch_size=14,
              intermediate_layers_indices=[2, 0], vision_output_dim=48, max_num_tiles=TILES)


def random_weights(model, seed=0):
  """Every weight O(1) random: gates, embeddings, norm scales and biases too."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "gate" in name:
        p.copy_(torch.randn(p.shape))
      elif p.ndim >= 2 and "embedding" not in name:
        p.copy_(torch.randn(p.shape) / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape))
      elif "layernorm" in name or "norm" in name:
        p.copy_(1 + 0.1 * torch.randn(p.shape))
      else:
        p.copy_(torch.randn(p.shape))
  return model


def vision_inputs():
  """pixel_values [2, 2, T, 3, H, W], aspect_ratio_ids [2, 2], aspect_ratio_mask [2, 2, T]
  as MllamaImageProcessor lays them out (tile 0 marked real even for a padded image)."""
  ids = np.array([[6, 2], [3, 0]])  # 2x2, 1x2 / 1x3, padding
  tiles = np.array([[4, 2], [3, 0]])
  mask = (np.arange(TILES) < tiles[..., None]).astype(np.int64)
  mask[..., 0] = 1
  pixels = np.random.default_rng(0).normal(size=(2, 2, TILES, 3, SIZE, SIZE)).astype(np.float32)
  pixels[np.arange(TILES)[None, None] >= tiles[..., None]] = 0  # padded tiles are zeros
  return pixels, ids, mask


def ours(config, params, pixels, ids, mask):
  b, n = ids.shape
  encoder = build_vision_encoder(config)
  tiles = pixels.transpose(0, 1, 2, 4, 5, 3).reshape(b * n, TILES, SIZE, SIZE, 3)
  out = jax.jit(encoder.apply)({"params": params}, tiles, ids.reshape(-1),
                               mask.reshape(b * n, TILES).astype(bool))
  return np.asarray(out).reshape(b, n, TILES, -1, out.shape[-1])


def test_vision_encoder_matches_transformers():
  from transformers import MllamaVisionConfig, MllamaVisionModel
  model = random_weights(MllamaVisionModel(MllamaVisionConfig(**VISION)).eval())
  config = vision_config({"vision_config": model.config.to_dict()})
  assert vision_feature_dim(config) == 48 and config.mllama.intermediate_layers == (2, 0)
  sd = StateDict({k: v.numpy() for k, v in model.state_dict().items()})
  params = convert_vision(sd, config, prefix="")
  sd.check_all_used("MllamaVisionModel")
  pixels, ids, mask = vision_inputs()

  def hf(ids_, mask_):
    with torch.no_grad():
      return model(pixel_values=torch.from_numpy(pixels), aspect_ratio_ids=torch.from_numpy(ids_),
                   aspect_ratio_mask=torch.from_numpy(mask_)).last_hidden_state.numpy()

  want = hf(ids, mask)
  got = ours(config, params, pixels, ids, mask)
  assert got.shape == want.shape == (2, 2, TILES, 5, 48)
  err = np.abs(got - want).max()
  print(f"mllama vision parity: max abs diff {err:.2e} (features up to {np.abs(want).max():.1f})")
  assert err < TOL
  # Not vacuous: the layout id and the tile mask change the features.
  other = ids.copy()
  other[0, 0] = 5  # 2x1 instead of 2x2
  assert np.abs(hf(other, mask) - want)[0, 0].min() > 0 and \
      np.abs(hf(other, mask) - want)[0, 0].max() > 1e-2
  assert np.abs(ours(config, params, pixels, other, mask) - hf(other, mask)).max() < TOL
  fewer = mask.copy()
  fewer[0, 0, 3] = 0
  assert np.abs(hf(ids, fewer) - want)[0, 0].max() > 1e-2
  assert np.abs(ours(config, params, pixels, ids, fewer) - hf(ids, fewer)).max() < TOL
