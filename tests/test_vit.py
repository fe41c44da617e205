"""Our CLIP ViT encoder reproduces OpenCLIP's VisionTransformer patch tokens.

The golden fixture is made by tests/fixtures/make_vit_fixture.py with the real
open_clip (it needs torchvision, so it runs outside the test venv).
"""
import os

import jax
import numpy as np
import pytest

from flamingo_jax.models.config import ViTConfig
from flamingo_jax.convert.openclip import convert_vit
from flamingo_jax.models.vit import VisionTransformer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "openclip_vit.npz")


def load_case(act):
  data = np.load(FIXTURE)
  sd = {k.split("/sd/", 1)[1]: data[k] for k in data.files if k.startswith(f"{act}/sd/")}
  return sd, data[f"{act}/images_nhwc"], data[f"{act}/tokens"]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_patch_tokens_match_open_clip(act):
  sd, images, want = load_case(act)
  config = ViTConfig(patch_size=8, width=32, depth=2, num_heads=4, activation=act)
  params = convert_vit(sd, config, image_size=32)
  got = jax.jit(VisionTransformer(config, 32).apply)({"params": params}, images)
  assert got.shape == (2, 4, 4, 32)
  np.testing.assert_allclose(np.asarray(got).reshape(2, 16, 32), want, atol=1e-5, rtol=1e-5)


def test_conversion_names_bad_tensor():
  sd, _, _ = load_case("gelu")
  config = ViTConfig(patch_size=8, width=32, depth=3, num_heads=4, activation="gelu")
  with pytest.raises(ValueError, match="missing tensor 'transformer.resblocks.2.attn"):
    convert_vit(sd, config, image_size=32)
  with pytest.raises(ValueError, match=r"'positional_embedding' has shape \(17, 32\), expected "
                     r"\(50, 32\)"):
    convert_vit(sd, ViTConfig(patch_size=8, width=32, depth=2, num_heads=4), image_size=56)
