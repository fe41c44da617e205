"""Per-image resampler latents (evaluate/features.py) equal the full path: the model fed
`visual_latents` gives the logits and generations of the model fed the features, and the
cache keys the latents by the resampler's weights (tiny model, gates open)."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.config import load_config
from flamingo_jax.models.config import model_config
from flamingo_jax.evaluate import decode, features
from flamingo_jax.models.flamingo import Flamingo

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")
IMG, EOC = 510, 511
ROWS = [[1, 5, IMG, 6, 7, EOC, IMG, 8, 9], [1, IMG, 12, 13, EOC, IMG, IMG, 15, 16, 17]]


@pytest.fixture(scope="module")
def setup():
  config = model_config(load_config(TINY))
  tokens, mask = decode.left_pad(ROWS, 12, 0)
  images = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 1, 32, 32, 3)), np.float32)
  model = Flamingo(config)
  params = jax.jit(lambda t, i: nn.unbox(model.init(jax.random.key(0), t, images=i)["params"]))(
      tokens, images)
  for j, name in enumerate(sorted(k for k in params if k.startswith("xattn_block_"))):
    params[name] = dict(params[name], attn_gate=jnp.full_like(params[name]["attn_gate"], 0.9),
                        ffw_gate=jnp.full_like(params[name]["ffw_gate"], -0.5 + 0.3 * j))
  feats = jax.jit(lambda p, i: model.apply({"params": p}, i, method="encode_images"))(
      params, images)
  latents = jax.jit(lambda p, f: model.apply({"params": p}, f, method="resample"))(params, feats)
  return dict(config=config, model=model, params=params, tokens=tokens, mask=mask,
              images=images, feats=np.asarray(feats), latents=np.asarray(latents))


def test_forward_and_prefill_with_latents_equal_features(setup):
  s = setup
  model, p = s["model"], {"params": s["params"]}
  want = model.apply(p, s["tokens"], visual_features=s["feats"], attention_mask=s["mask"])[0]
  got = model.apply(p, s["tokens"], attention_mask=s["mask"], visual_latents=s["latents"])[0]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  kw = dict(cache_length=16, method="prefill")
  want_p, cache_f = model.apply(p, s["tokens"], None, s["feats"], s["mask"], **kw)
  got_p, cache_l = model.apply(p, s["tokens"], None, None, s["mask"],
                               visual_latents=s["latents"], **kw)
  np.testing.assert_allclose(got_p, want_p, atol=1e-5, rtol=1e-5)
  real = np.asarray(s["mask"], bool)  # prefill = full forward at the real tokens
  np.testing.assert_allclose(np.asarray(got_p)[real], np.asarray(want)[real], atol=1e-5,
                             rtol=1e-5)
  for a, b in zip(cache_l.xattn_keys, cache_f.xattn_keys):
    assert a.shape == (2, s["config"].xattn.num_heads, 3, s["latents"].shape[2],
                       s["config"].xattn.head_dim)  # head-major [B, H, N, n, Dh]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="not visual_features and visual_latents"):
    model.apply(p, s["tokens"], visual_features=s["feats"], visual_latents=s["latents"])
  with pytest.raises(ValueError, match="visual_latents are 7 wide"):
    model.apply(p, s["tokens"], visual_latents=np.zeros(s["latents"].shape[:3] + (7,)))
  with pytest.raises(ValueError, match=r"only 1 image slots were given \(visual_latents\)"):
    model.apply(p, s["tokens"], visual_latents=s["latents"][:, :1])


@pytest.mark.parametrize("kw", [
    dict(method="beam", num_beams=3),  # what captioning runs
    pytest.param(dict(method="greedy"), marks=pytest.mark.slow),
    pytest.param(dict(method="greedy", use_cache=False), marks=pytest.mark.slow)])
def test_generate_with_latents_equals_features(setup, kw):
  s = setup
  options = decode.DecodeConfig(max_new_tokens=6, min_new_tokens=6, **kw)
  fn = decode.compiled_generate(s["config"], options)  # the Generator's, same shapes
  rng = jax.random.fold_in(jax.random.key(0), 0)  # the Generator's: its compilations reused
  want = fn(s["params"], s["tokens"], s["mask"], None, s["feats"], rng)
  got = fn(s["params"], s["tokens"], s["mask"], None, None, rng, s["latents"])
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.scores, want.scores, atol=1e-5, rtol=1e-5)
  gen = decode.Generator(s["config"], options, batch_size=2, prompt_buckets=(12,))
  counts = decode.count_image_tokens(ROWS, IMG)
  per = lambda a: [a[i, :n] for i, n in enumerate(counts)]  # noqa: E731  [N_i, ...] per prompt
  assert gen(s["params"], ROWS, visual_latents=per(s["latents"])) == \
      gen(s["params"], ROWS, visual_features=per(s["feats"]))
  with pytest.raises(ValueError, match="not visual_features and visual_latents"):
    gen(s["params"], ROWS, visual_features=per(s["feats"]), visual_latents=per(s["latents"]))


def test_feature_cache_latents_on_disk_keyed_by_resampler(setup, tmp_path):
  s = setup
  paths = []
  for i in range(5):  # 5 images, one batch of 4 and one padded
    paths.append(str(tmp_path / f"{i}.npy"))
    np.save(paths[-1], s["images"].reshape(-1, 1, 32, 32, 3)[i])
  load = lambda p: np.load(p)  # noqa: E731  [T, H, W, 3]
  cache_dir = str(tmp_path / "cache")
  make = lambda params: features.FeatureCache(params, s["config"], load, batch_size=4,  # noqa: E731
                                              cache_dir=cache_dir)
  first = make(s["params"])
  got = first.latents(paths + paths[:2])  # repeats are computed once
  assert first.latents_computed == 5 and first.computed == 5
  want = s["latents"].reshape(-1, *s["latents"].shape[2:])[:5]  # [n, D_r] per image
  for g, w in zip(got, list(want) + list(want[:2])):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
  assert len(list((tmp_path / "cache" / "latents").glob("*.npy"))) == 5
  assert len(list((tmp_path / "cache").glob("*.npy"))) == 5  # the features beside them
  again = make(s["params"])
  np.testing.assert_array_equal(np.stack(again.latents(paths)), np.stack(got[:5]))
  assert (again.latents_loaded, again.latents_computed, again.computed, again.loaded) == \
      (5, 0, 0, 0)  # neither the vision encoder nor the features' files are needed
  # Other resampler weights, same vision weights: the features load, the latents do not.
  other = jax.tree.map(lambda a: a, s["params"])
  other["resampler"] = jax.tree.map(lambda a: a * 1.5, other["resampler"])
  retrained = make(other)
  new = retrained.latents(paths)
  assert (retrained.loaded, retrained.computed, retrained.latents_computed) == (5, 0, 5)
  assert not np.allclose(new[0], got[0])
  media = dataclasses.replace(s["config"], resampler=dataclasses.replace(
      s["config"].resampler, num_media_embeddings=4))
  assert not features.latents_supported(media)
  with pytest.raises(ValueError, match="num_media_embeddings = 0"):
    features.FeatureCache(s["params"], media, load, batch_size=4).latents(paths)


def test_params_fingerprint_memo_follows_the_arrays(setup):
  p = setup["params"]
  a = features.params_fingerprint(p)
  assert features.params_fingerprint(p) == a == features.params_fingerprint(dict(p))
  changed = dict(p, resampler=jax.tree.map(lambda x: x + 1.0, p["resampler"]))
  assert features.params_fingerprint(changed) != a
  assert features.params_fingerprint(p, "salt") != a
