"""Parity with the peers' modules: with weights copied across, our Perceiver
Resampler and GATED XATTN-DENSE block reproduce lucidrains' flamingo-pytorch
and OpenFlamingo's `open_flamingo/src/helpers.py` to 1e-5 in float32 when
configured like them (GELU, their head sizes, no K/V LayerNorm, their masks).
"""
import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flamingo_jax.models.config import ResamplerConfig, XAttnConfig  # noqa: E402
from flamingo_jax.convert.openflamingo import convert_gated_xattn, convert_resampler  # noqa: E402
from flamingo_jax.models import masking  # noqa: E402
from flamingo_jax.models.resampler import PerceiverResampler  # noqa: E402
from flamingo_jax.models.xattn import GatedCrossAttentionBlock  # noqa: E402

IMG = 7
ATOL = 1e-5


def load_openflamingo_helpers():
  """open_flamingo's package __init__ imports open_clip; load the module file by path."""
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    pytest.skip("open-flamingo is not installed (make test installs it)")
  path = os.path.join(spec.submodule_search_locations[0], "src", "helpers.py")
  mspec = importlib.util.spec_from_file_location("open_flamingo_helpers", path)
  module = importlib.util.module_from_spec(mspec)
  mspec.loader.exec_module(module)
  return module


def lucidrains():
  return pytest.importorskip("flamingo_pytorch.flamingo_pytorch")


def randomize(module, seed):
  """Every parameter random (gates and LayerNorms included) so a swapped tensor shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in module.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.5)
  return module.eval()


def state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def peer_resampler_config(**kw):
  base = dict(depth=2, width=32, num_heads=4, head_dim=8, num_latents=5, ffw_mult=4,
              activation="gelu", input_proj=False, temporal_embeddings=False,
              num_media_embeddings=0, use_bias=False)
  return ResamplerConfig(**{**base, **kw})


def peer_xattn_config(**kw):
  base = dict(num_heads=4, head_dim=8, ffw_mult=4, activation="gelu", kv_layernorm=False,
              query_layernorm=True, ffw_layernorm=True, gate_shape="scalar",
              no_image="zero_attention")
  return XAttnConfig(**{**base, **kw})


def run_resampler(config, params, feats):
  return np.asarray(jax.jit(PerceiverResampler(config).apply)({"params": params}, feats))


def test_resampler_matches_flamingo_pytorch():
  fp = lucidrains()
  ref = randomize(fp.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5,
                                        num_media_embeds=3, ff_mult=4), 0)
  x = torch.randn(2, 3, 6, 32, generator=torch.Generator().manual_seed(1))  # [b, m, n, d]
  with torch.no_grad():
    want = ref(x).numpy()  # [b, m, latents, d]
  config = peer_resampler_config(num_media_embeddings=3)
  params = convert_resampler(state(ref), config)
  got = run_resampler(config, params, jnp.asarray(x.numpy())[:, :, None])  # T = 1
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)


def test_resampler_matches_openflamingo_with_frames_and_media():
  of = load_openflamingo_helpers()
  ref = randomize(of.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5,
                                        max_num_media=3, max_num_frames=4, ff_mult=4), 2)
  x = torch.randn(2, 3, 4, 6, 32, generator=torch.Generator().manual_seed(3))  # b T F v D
  with torch.no_grad():
    want = ref(x).numpy()
  config = peer_resampler_config(num_media_embeddings=3, temporal_embeddings=True, max_frames=4)
  params = convert_resampler(state(ref), config)
  got = run_resampler(config, params, jnp.asarray(x.numpy()))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)
  # Fewer frames than trained: both use the first temporal embeddings.
  with torch.no_grad():
    want2 = ref(x[:, :, :2]).numpy()
  np.testing.assert_allclose(run_resampler(config, params, jnp.asarray(x[:, :, :2].numpy())),
                             want2, atol=ATOL, rtol=ATOL)


def media_locations(seed, b, length, first_is_image):
  rng = np.random.default_rng(seed)
  loc = rng.random((b, length)) < 0.2
  loc[:, 0] = first_is_image
  if not first_is_image:
    loc[:, :2] = False  # text before the first image
  return loc


def run_block(config, params, x, media, loc):
  tokens = jnp.where(jnp.asarray(loc), IMG, 1)
  phi = masking.phi(tokens, IMG)
  n_img, n_tok = media.shape[1], media.shape[2]
  mask = masking.visual_attention_mask(phi, n_img, n_tok, config.attend_previous)
  visual = jnp.asarray(media).reshape(media.shape[0], n_img * n_tok, media.shape[-1])
  apply = jax.jit(GatedCrossAttentionBlock(config).apply)
  return np.asarray(apply({"params": params}, jnp.asarray(x), visual, mask, phi > 0))


@pytest.mark.parametrize("immediate", [True, False])
def test_gated_xattn_matches_flamingo_pytorch(immediate):
  fp = lucidrains()
  ref = randomize(fp.GatedCrossAttentionBlock(dim=32, dim_head=8, heads=4, ff_mult=4,
                                              only_attend_immediate_media=immediate), 4)
  g = torch.Generator().manual_seed(5)
  x, media = torch.randn(2, 20, 32, generator=g), torch.randn(2, 6, 3, 32, generator=g)
  # flamingo-pytorch averages over all images for text before the first image
  # when attending to all previous ones; start with an image there.
  loc = media_locations(6, 2, 20, first_is_image=not immediate)
  loc = loc & (np.cumsum(loc, -1) <= 6)
  with torch.no_grad():
    want = ref(x, media, media_locations=torch.from_numpy(loc)).numpy()
  config = peer_xattn_config(attend_previous="last" if immediate else "all")
  params = convert_gated_xattn(state(ref), config, width=32, visual_width=32)
  got = run_block(config, params, x.numpy(), media.numpy(), loc)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("immediate", [True, False])
def test_gated_xattn_matches_openflamingo(immediate):
  of = load_openflamingo_helpers()
  # OpenFlamingo: visual width differs from the LM width (1024 vs 4096 there).
  ref = randomize(of.GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4,
                                              ff_mult=4,
                                              only_attend_immediate_media=immediate), 7)
  g = torch.Generator().manual_seed(8)
  x, media = torch.randn(2, 20, 32, generator=g), torch.randn(2, 6, 3, 24, generator=g)
  loc = media_locations(9, 2, 20, first_is_image=not immediate)
  loc = loc & (np.cumsum(loc, -1) <= 6)
  with torch.no_grad():
    want = ref(x, media, media_locations=torch.from_numpy(loc)).numpy()
  config = peer_xattn_config(attend_previous="last" if immediate else "all")
  params = convert_gated_xattn(state(ref), config, width=32, visual_width=24)
  got = run_block(config, params, x.numpy(), media.numpy(), loc)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)


def test_conversion_errors_name_the_tensor():
  of = load_openflamingo_helpers()
  ref = of.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=5)
  sd = state(ref)
  config = peer_resampler_config()
  with pytest.raises(ValueError, match=r"tensor 'layers.0.0.to_kv.weight' has shape \(64, 32\), "
                     r"expected \(48, 32\)"):
    convert_resampler(sd, dataclasses.replace(config, head_dim=6))
  del sd["layers.1.1.3.weight"]
  with pytest.raises(ValueError, match="missing tensor 'layers.1.1.3.weight'"):
    convert_resampler(sd, config)
  with pytest.raises(ValueError, match="were not converted"):
    convert_resampler(state(ref), dataclasses.replace(config, depth=1))
