"""Pixels: decoding, aspect-preserving resize with mean padding, augmentation."""
import io

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data import images
from flamingo_jax.data.config import ImageConfig

CFG = ImageConfig(size=32, mean=(100.0, 110.0, 120.0), std=(50.0, 50.0, 50.0), flip=True,
                  colour_jitter=0.0)


def encode(arr, fmt="PNG", mode=None):
  buf = io.BytesIO()
  img = Image.fromarray(arr)
  if mode:
    img = img.convert(mode)
  img.save(buf, format=fmt)
  return buf.getvalue()


def test_decode_formats_and_modes():
  rgb = np.zeros((6, 10, 3), np.uint8)
  rgb[:, :5] = (255, 0, 0)
  assert images.decode(encode(rgb)).tolist() == rgb.tolist()
  assert images.decode(encode(rgb, mode="L")).shape == (6, 10, 3)
  assert images.decode(encode(rgb, mode="RGBA")).shape == (6, 10, 3)
  assert images.decode(encode(rgb, mode="P")).shape == (6, 10, 3)
  assert images.decode(rgb[..., 0]).shape == (6, 10, 3)  # arrays (TFDS) too
  big = encode(np.zeros((400, 300, 3), np.uint8), "JPEG")
  small = images.decode(big, size=64)  # JPEG draft: a cheap power-of-two downscale
  assert min(small.shape[:2]) >= 64 and small.shape[0] < 400


@pytest.mark.parametrize("bad", [b"", b"junk", encode(np.zeros((8, 8, 3), np.uint8),
                                                      "JPEG")[:40],
                                 np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((0, 4, 3), np.uint8), "not bytes"])
def test_decode_rejects_bad_images(bad):
  with pytest.raises(images.BadImage):
    images.decode(bad)


def test_aspect_preserving_resize_with_mean_padding():
  wide = np.full((20, 40, 3), 200, np.uint8)  # 2:1 -> 32 x 16, padded top and bottom
  out = images.process([wide], CFG, None, train=False)
  assert out.shape == (1, 32, 32, 3) and out.dtype == np.float32
  content = out[0, 8:24]
  expect = np.broadcast_to((200 - np.array(CFG.mean)) / 50.0, content.shape)
  np.testing.assert_allclose(content, expect, atol=1e-5)
  assert not out[0, :8].any() and not out[0, 24:].any()  # the mean normalises to 0
  tall = np.full((40, 10, 3), 200, np.uint8)
  out = images.process([tall], CFG, None, train=False)
  assert not out[0, :, :12].any() and out[0, :, 12:20].all()


def test_normalisation_to_zero_mean_unit_variance():
  arr = np.empty((32, 32, 3), np.uint8)
  arr[:] = (150, 160, 170)  # mean + 1 std
  np.testing.assert_allclose(images.process([arr], CFG, None, False), 1.0, atol=1e-5)


def test_flip_and_colour_jitter_in_training_only():
  arr = np.zeros((32, 32, 3), np.uint8)
  arr[:, :8] = 255
  base = images.process([arr], CFG, None, train=False)[0]
  flips = [images.process([arr], CFG, np.random.default_rng(s), train=True)[0]
           for s in range(20)]
  n_flipped = sum(np.array_equal(f, base[:, ::-1]) for f in flips)
  n_same = sum(np.array_equal(f, base) for f in flips)
  assert n_flipped + n_same == 20 and 3 <= n_flipped <= 17
  no_flip = ImageConfig(**{**CFG.__dict__, "flip": False, "colour_jitter": 0.3})
  jittered = images.process([arr], no_flip, np.random.default_rng(0), train=True)[0]
  assert not np.allclose(jittered, base) and jittered.shape == base.shape
  x = np.random.default_rng(1).uniform(0, 255, (4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(images.colour_jitter(x, np.ones(3, np.float32)), x, rtol=1e-5)
  gray = images.colour_jitter(x, np.array([1, 1, 0], np.float32))
  np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-3)


def test_video_frames_share_one_augmentation():
  frame = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
  cfg = ImageConfig(**{**CFG.__dict__, "colour_jitter": 0.3})
  out = images.process([frame] * 4, cfg, np.random.default_rng(3), train=True)
  for t in range(1, 4):
    np.testing.assert_array_equal(out[t], out[0])
