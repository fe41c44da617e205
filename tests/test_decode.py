"""Cached decoding and scoring equal the full forward (tiny model, gates open)."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.config import model_config
from flamingo_jax.config import load_config
from flamingo_jax.evaluate import decode, scoring
from flamingo_jax.models.flamingo import Flamingo

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")
IMG, EOC = 510, 511
PAD = 0


def _prompts():
  """Left-padded prompts: several images, text before the first image, <image><image>."""
  rows = [
      [1, 5, IMG, 6, 7, EOC, IMG, 8, 9],
      [1, IMG, 12, 13, EOC, IMG, IMG, 15, 16, 17, 18, 19],
      [1, 30, 31, 32, EOC, 33, 34, EOC, IMG, 35],
  ]
  tokens, mask = decode.left_pad(rows, 12, PAD)
  return rows, jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope="module")
def setup():
  config = model_config(load_config(TINY))
  rows, tokens, mask = _prompts()
  images = jax.random.normal(jax.random.key(1), (3, 3, 1, 32, 32, 3))
  model = Flamingo(config)
  params = jax.jit(lambda t, i: nn.unbox(model.init(jax.random.key(0), t, images=i)["params"]))(
      tokens, images)
  # Open the gates (different per block), so the images matter.
  for j, name in enumerate(sorted(k for k in params if k.startswith("xattn_block_"))):
    block = dict(params[name])
    block["attn_gate"] = jnp.full_like(block["attn_gate"], 0.8 + 0.3 * j)
    block["ffw_gate"] = jnp.full_like(block["ffw_gate"], -0.6 + 0.2 * j)
    params[name] = block
  return dict(config=config, rows=rows, tokens=tokens, mask=mask, images=images,
              params=params, model=model)


@functools.lru_cache(maxsize=None)
def _forward_fn(config):
  model = Flamingo(config)
  return jax.jit(lambda p, t, i, a: model.apply({"params": p}, t, images=i,
                                                attention_mask=a)[0])


@functools.lru_cache(maxsize=None)
def _generate_fn(config, options):
  return jax.jit(functools.partial(decode.generate, config=config, options=options))


def _full_logits(s, tokens, mask):
  return np.asarray(_forward_fn(s["config"])(s["params"], tokens, s["images"], mask))


def test_cached_logits_equal_full_forward(setup):
  s = setup
  model, params = s["model"], s["params"]
  # Teacher-forced continuation; row 0 reads a third image mid-continuation.
  cont = jnp.array([[40, 41, IMG, 42, 43, 54], [44, 45, 46, 47, 48, 55],
                    [49, 50, 51, 52, 53, 56]])
  full = _full_logits(s, jnp.concatenate([s["tokens"], cont], 1),
                      jnp.concatenate([s["mask"], jnp.ones_like(cont)], 1))
  prefill = jax.jit(functools.partial(model.apply, method="prefill"),
                    static_argnames="cache_length")
  extend = jax.jit(functools.partial(model.apply, method="extend"))
  logits, cache = prefill({"params": params}, s["tokens"], s["images"], None, s["mask"],
                          cache_length=18)
  real = np.asarray(s["mask"], bool)
  np.testing.assert_allclose(np.asarray(logits)[real], full[:, :12][real], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cache.image_count, [2, 3, 1])
  np.testing.assert_array_equal(cache.num_tokens, [len(r) for r in s["rows"]])
  for j in range(cont.shape[1]):
    logits, cache = extend({"params": params}, cont[:, j:j + 1], cache)
    np.testing.assert_allclose(logits[:, 0], full[:, 12 + j], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cache.image_count, [3, 3, 1])  # phi kept in the cache
  # The image read mid-continuation matters (so the check above is not vacuous).
  assert np.abs(full[0, 14] - full[0, 13]).max() > 1e-3


def _generate(s, **kw):
  fn = _generate_fn(s["config"], decode.DecodeConfig(max_new_tokens=6, **kw))
  return jax.device_get(fn(s["params"], s["tokens"], s["mask"], s["images"], None,
                           jax.random.key(3)))


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_cached_generation_equals_uncached(setup, method):
  cached = _generate(setup, method=method)
  uncached = _generate(setup, method=method, use_cache=False)
  np.testing.assert_array_equal(cached.tokens, uncached.tokens)
  np.testing.assert_array_equal(cached.lengths, uncached.lengths)
  np.testing.assert_allclose(cached.scores, uncached.scores, atol=1e-4)
  # Image-dependent, non-trivial continuations.
  assert len({tuple(r) for r in cached.tokens}) > 1
  assert all(len(set(r)) > 1 for r in cached.tokens)
  if method == "beam":  # beam search finds at least as likely a continuation as greedy
    greedy = _generate(setup, method="greedy")
    assert (cached.scores >= greedy.scores - 1e-4).all()


@pytest.mark.parametrize("suppress", [True, False])
def test_tree_beam_search_equals_flat_and_uncached(setup, suppress):
  """Beam search on one cache row per prompt (slot table reordered) gives the tokens
  and scores of the per-beam cache (`recompute_cross_kv`: the flat stepper) and of the
  full forward; with <image> allowed, a generated image token moves phi as in extend."""
  kw = dict(method="beam", num_beams=3, suppress_image_token=suppress)
  tree = _generate(setup, **kw)
  flat = _generate(setup, recompute_cross_kv=True, **kw)
  full = _generate(setup, use_cache=False, **kw)
  for other in (flat, full):
    np.testing.assert_array_equal(tree.tokens, other.tokens)
    np.testing.assert_array_equal(tree.lengths, other.lengths)
    np.testing.assert_allclose(tree.scores, other.scores, atol=1e-4)


def _check_greedy_chain(s, out):
  """Each greedy token is the argmax of a full forward over everything before it."""
  seq = jnp.concatenate([s["tokens"], jnp.asarray(out.tokens)], 1)
  mask = jnp.concatenate([s["mask"], jnp.ones_like(out.tokens)], 1)
  logits = np.array(_full_logits(s, seq, mask))
  logits[..., IMG] = -np.inf  # never generated
  want = np.argmax(logits[:, 11:17], -1)
  for r in range(3):
    n = out.lengths[r]
    np.testing.assert_array_equal(out.tokens[r, :n], want[r, :n])
    assert (out.tokens[r, n:] == PAD).all()


def test_greedy_is_a_full_forward_argmax_chain(setup):
  _check_greedy_chain(setup, _generate(setup, method="greedy"))


def test_sampling_with_top_k_1_is_greedy(setup):
  greedy = _generate(setup, method="greedy")
  sampled = _generate(setup, method="sample", top_k=1, temperature=0.7)
  np.testing.assert_array_equal(sampled.tokens, greedy.tokens)


def test_stops_at_eoc(setup):
  """Give <EOC> the output row of a token greedy decoding picks: it stops there."""
  s = dict(setup)
  base = _generate(s, method="greedy")
  params = dict(s["params"])
  target = int(base.tokens[0, 2])
  row = params["lm"]["embedding"][target] * 1.5
  params["new_token_embeddings"] = params["new_token_embeddings"].at[1].set(row)
  s["params"] = params
  for method in ("greedy", "beam"):
    cached = _generate(s, method=method)
    uncached = _generate(s, method=method, use_cache=False)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)
    np.testing.assert_array_equal(cached.lengths, uncached.lengths)
    assert (cached.lengths < 6).any(), cached.tokens
    for r in range(3):
      n = cached.lengths[r]
      assert (cached.tokens[r, n:] == PAD).all()
      assert EOC not in cached.tokens[r, :n - 1]
      if n < 6:
        assert cached.tokens[r, n - 1] == EOC
    if method == "greedy":
      _check_greedy_chain(s, cached)


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top2 = decode.filter_logits(logits, top_k=2)
  assert np.isfinite(np.asarray(top2)[0, :2]).all() and np.isinf(np.asarray(top2)[0, 2:]).all()
  nucleus = np.asarray(decode.filter_logits(logits, top_p=0.75))
  assert np.isfinite(nucleus[0, :2]).all() and np.isinf(nucleus[0, 2:]).all()
  assert np.isfinite(np.asarray(decode.filter_logits(logits, top_p=0.4))[0]).sum() == 1


def test_generator_buckets_and_padding(setup):
  """Padding to a longer bucket and a fixed batch changes no token."""
  s = setup
  ref = _generate(s, method="greedy")
  images = [np.asarray(s["images"][i, :n]) for i, n in enumerate([2, 3, 1])]
  gen = decode.Generator(s["config"], decode.DecodeConfig(method="greedy", max_new_tokens=6),
                         batch_size=2, prompt_buckets=(16,))
  out = gen(s["params"], s["rows"], images)
  for r in range(3):
    want = [int(t) for t in ref.tokens[r, :ref.lengths[r]] if t != EOC]
    assert out[r] == want


def test_generator_with_shardings(setup):
  """Params replicated and the batch split over a 2-device mesh: the same tokens."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  s = setup
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (conftest fakes 8 CPU devices)")
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), s["params"])
  images = [np.asarray(s["images"][i, :n]) for i, n in enumerate([2, 3, 1])]
  options = decode.DecodeConfig(method="beam", max_new_tokens=6)
  sharded = decode.Generator(s["config"], options, batch_size=2, prompt_buckets=(16,),
                             param_shardings=replicated,
                             data_sharding=NamedSharding(mesh, P("data")))
  ref = _generate(s, method="beam")
  out = sharded(s["params"], s["rows"], images)
  for r in range(3):
    assert out[r] == [int(t) for t in ref.tokens[r, :ref.lengths[r]] if t != EOC]


def test_bad_inputs(setup):
  s = setup
  with pytest.raises(ValueError, match="method"):
    decode.DecodeConfig(method="nucleus").validate(s["config"])
  with pytest.raises(ValueError, match="top_p"):
    decode.DecodeConfig(method="sample", top_p=0.0).validate(s["config"])
  with pytest.raises(ValueError, match="vocab_limit"):
    decode.DecodeConfig(vocab_limit=100).validate(s["config"])
  gen = decode.Generator(s["config"], decode.DecodeConfig(method="greedy"), batch_size=2)
  with pytest.raises(ValueError, match="prompt 0 has 2 <image> tokens but 1 images"):
    gen(s["params"], s["rows"][:1], [np.zeros((1, 1, 32, 32, 3), np.float32)])
  with pytest.raises(ValueError, match="shorter than the prompt"):
    s["model"].apply({"params": s["params"]}, s["tokens"], s["images"], None, s["mask"],
                     cache_length=4, method="prefill")


def _reference_logprobs(s, options, width):
  """[3, O, width] log p of each option token by the full forward over prompt + option."""
  table = np.zeros((3, len(options), width), np.int32)
  for o, opt in enumerate(options):
    table[:, o, :len(opt)] = opt
  ref = jax.jit(functools.partial(scoring.option_logprobs, config=s["config"],
                                  use_cache=False))(
      s["params"], s["tokens"], s["mask"], jnp.asarray(table), s["images"])
  return np.asarray(ref)


# Shared prefixes (a trie of depth 5), a duplicate, a one-token option that is also
# another's prefix, and options in no sorted order.
TRIE_OPTIONS = [[60, 61, 62], [63], [64, 65, 66, 67, 68], [69, 70], [60, 61, 71], [60, 72],
                [64, 65, 66, 73], [63, 74], [60, 61, 62], [75, 76, 77, 78], [64, 79]]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_scoring_trie_equals_uncached(setup, chunk):
  """The prefix-tree scorer (chunks cut anywhere in the tree, including mid-path)
  gives each option token the log-prob of the full forward over prompt + option."""
  s = setup
  options = TRIE_OPTIONS
  images = [np.asarray(s["images"][i, :n]) for i, n in enumerate([2, 3, 1])]
  scorer = scoring.Scorer(s["config"], batch_size=2, prompt_buckets=(16,),
                          option_buckets=(8,), option_chunk=chunk)
  logp, lengths = scorer.token_logprobs(s["params"], s["rows"], options, images)
  assert logp.shape == (3, len(options), 5)
  np.testing.assert_array_equal(lengths, [len(o) for o in options])
  ref = _reference_logprobs(s, options, 8)[..., :5]
  valid = np.arange(5)[None, None] < lengths[None, :, None]
  assert np.all(logp[~np.broadcast_to(valid, logp.shape)] == 0)
  np.testing.assert_allclose(np.where(valid, logp, 0), np.where(valid, ref, 0), atol=1e-5)
  scores = scorer(s["params"], s["rows"], options, images)
  np.testing.assert_allclose(scores, (np.where(valid, ref, 0).sum(-1) / lengths), atol=1e-5)
  assert scores.shape == (3, len(options))


def test_scoring_copies_equal_uncached(setup):
  """`continuation_logprobs` (each option against its own copy of the cache)."""
  s = setup
  options = [[60, 61, 62], [63], [64, 65, 66, 67, 68], [69, 70]]
  table = np.zeros((3, 4, 8), np.int32)
  for o, opt in enumerate(options):
    table[:, o, :len(opt)] = opt
  got = jax.jit(functools.partial(scoring.option_logprobs, config=s["config"]))(
      s["params"], s["tokens"], s["mask"], jnp.asarray(table), s["images"])
  valid = np.arange(8)[None, None] < np.array([len(o) for o in options])[None, :, None]
  ref = _reference_logprobs(s, options, 8)
  np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, ref, 0), atol=1e-5)


def test_option_trie_layout():
  trie = scoring.OptionTrie.build(TRIE_OPTIONS)
  # distinct prefixes, each once
  prefixes = {tuple(o[:d + 1]) for o in TRIE_OPTIONS for d in range(len(o))}
  assert trie.num_nodes == len(prefixes)
  for o, opt in enumerate(TRIE_OPTIONS):
    path = trie.paths[o, :len(opt)]
    assert list(trie.tokens[path]) == opt and list(trie.depth[path]) == list(range(len(opt)))
    assert list(trie.parent[path]) == [-1] + list(path[:-1])
    assert np.all(trie.paths[o, len(opt):] == -1)
  chunks = trie.chunks(3, pad_token_id=PAD)
  scored = chunks["node"][chunks["node"] >= 0]
  assert sorted(scored) == list(range(trie.num_nodes))  # every node scored exactly once
  for j in range(len(chunks["tokens"])):
    for slot in np.flatnonzero(chunks["node"][j] >= 0):
      node = chunks["node"][j][slot]
      seen = np.flatnonzero(chunks["allowed"][j][slot])
      want = trie.ancestors(node) + [node]  # ancestors and itself, from this chunk's slots
      assert [int(chunks["tokens"][j][k]) for k in seen] == [int(trie.tokens[n]) for n in want]
  with pytest.raises(ValueError, match="context"):
    trie.chunks(3, context=2)


def test_scoring_rejects_image_token_in_options(setup):
  s = setup
  scorer = scoring.Scorer(s["config"], batch_size=2, prompt_buckets=(16,))
  images = [np.asarray(s["images"][i, :n]) for i, n in enumerate([2, 3, 1])]
  with pytest.raises(ValueError, match="option 1 contains the <image>"):
    scorer(s["params"], s["rows"], [[60], [61, IMG]], images)