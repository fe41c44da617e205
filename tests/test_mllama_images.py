"""Llama 3.2 Vision's image tiling (flamingo_jax/data/mllama_images.py) equals
transformers' MllamaImageProcessor (its PIL backend; the torchvision one is not
installed here) on images of real shapes: tall, wide, small (upscaled), large
(downscaled), exactly one tile, in rows of different image counts, at a tiny
tile size and at Llama 3.2 Vision Instruct's 560 px: pixel values, aspect-ratio
ids, masks and tile counts."""
import numpy as np
import pytest

pytest.importorskip("transformers")

from flamingo_jax.data import mllama_images  # noqa: E402


def hf_processor(tile):
  from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
  return MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=4,
                                 image_mean=list(mllama_images.CLIP_MEAN),
                                 image_std=list(mllama_images.CLIP_STD))


def image(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("tile, shapes", [
    (28, [[(100, 30), (30, 120)], [(10, 12)], [(200, 150), (28, 28), (60, 20)]]),
    (560, [[(1200, 800)], [(300, 2000), (640, 480)]]),
])
def test_tiling_equals_mllama_image_processor(tile, shapes):
  batch = [[image(h, w, 10 * r + i) for i, (h, w) in enumerate(row)]
           for r, row in enumerate(shapes)]
  want = hf_processor(tile)(images=batch, return_tensors="np")
  got = mllama_images.pack(batch, tile)
  assert got["num_tiles"] == want["num_tiles"]
  np.testing.assert_array_equal(got["aspect_ratio_ids"], want["aspect_ratio_ids"])
  hf_mask = got["tile_mask"].astype(np.int64)
  hf_mask[..., 0] = 1  # transformers marks tile 0 real, padded image slots too
  np.testing.assert_array_equal(hf_mask, want["aspect_ratio_mask"])
  pixels = got["images"].transpose(0, 1, 2, 5, 3, 4)  # -> [B, N, T, 3, H, W]
  assert pixels.shape == want["pixel_values"].shape
  np.testing.assert_allclose(pixels, want["pixel_values"], atol=1e-5)
  # the layouts are all used: tall, wide, multi-tile and one-tile images
  assert len({int(i) for i in got["aspect_ratio_ids"].ravel()} - {0}) >= 3


def test_layouts_and_errors():
  assert mllama_images.supported_aspect_ratios(4) == [
      (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
  assert mllama_images.optimal_canvas(1000, 300, 560, mllama_images.supported_aspect_ratios(4)) \
      == (2, 1)
  with pytest.raises(ValueError, match="uint8"):
    mllama_images.tile_image(np.zeros((4, 4, 3), np.float32), 28)
