"""Close-ended scoring: the log-likelihood of each option after a shared prompt.

ImageNet has 1000 class names to rank after one prompt, so the prompt (its
images, the resampler, the cross-attention keys/values and the self-attention
keys/values of every prompt token) is encoded once (`Flamingo.prefill`). The
options are then scored as a prefix tree (`OptionTrie`): each distinct prefix
token is one node, run once per prompt, in chunks of nodes that all attend to
the one prompt cache (no copy of the cache per option) and to their own
ancestors. That equals running each option on its own after the prompt: the
uncached reference (`option_logprobs(use_cache=False)`) runs the full forward
over prompt + option for every option, and `continuation_logprobs` the
options against per-option copies of the cache. Scores are
`classification.option_scores` of the per-token log-probabilities: the mean
per token by default (OpenFlamingo's length normalisation), the sum with
normalize=False.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.evaluate import classification
from flamingo_jax.evaluate.decode import (DEFAULT_BUCKETS, Placement, bucket,
                                          check_image_counts, count_image_tokens, left_pad,
                                          masked_extend, stack_images)
from flamingo_jax.models.flamingo import DecodeCache, Flamingo
from flamingo_jax.models.lm import default_positions


def _model(config: FlamingoConfig) -> Flamingo:
  return Flamingo(dataclasses.replace(config, remat="none"))


def encode_prompts(params, tokens, attention_mask, images=None, visual_features=None, *,
                   config: FlamingoConfig, max_option_length: int):
  """Prompts -> (log p of the next token [B, V] f32, DecodeCache with room for the options).

  tokens [B, P] left padded; images [B, N, T, H, W, 3] or visual_features.
  """
  logits, cache = _model(config).apply(
      {"params": params}, tokens, images, visual_features, attention_mask,
      cache_length=tokens.shape[1] + max_option_length, method="prefill")
  return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1), cache


def continuation_logprobs(params, next_logp, cache: DecodeCache, options, *,
                          config: FlamingoConfig):
  """log p of each option token given the encoded prompt and the option's earlier tokens.

  next_logp [B, V] and cache from `encode_prompts`; options [B, O, T] int
  (right padded: the values past an option's length are junk to ignore).
  Returns [B, O, T] float32.
  """
  b, o, t = options.shape
  rows = jnp.repeat(jnp.arange(b), o)
  flat = options.reshape(b * o, t)
  logits, _ = _model(config).apply({"params": params}, flat, cache.take_rows(rows),
                                   method="extend")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  first = jnp.take_along_axis(next_logp[rows], flat[:, :1], axis=-1)  # [B*O, 1]
  rest = jnp.take_along_axis(logp[:, :-1], flat[:, 1:, None], axis=-1)[..., 0]
  return jnp.concatenate([first, rest], axis=1).reshape(b, o, t)


def option_logprobs(params, tokens, attention_mask, options, images=None,
                    visual_features=None, *, config: FlamingoConfig, use_cache: bool = True):
  """[B, O, T] log p of each option token after its prompt, cached or not.

  tokens [B, P] left padded (attention_mask [B, P]); options [B, O, T] right
  padded. use_cache=False: the full forward over prompt + option, once per
  option (the reference the cached path is tested against).
  """
  b, o, t = options.shape
  if use_cache:
    next_logp, cache = encode_prompts(params, tokens, attention_mask, images, visual_features,
                                      config=config, max_option_length=t)
    return continuation_logprobs(params, next_logp, cache, options, config=config)
  rep = lambda a: None if a is None else jnp.repeat(a, o, axis=0)  # noqa: E731
  flat = options.reshape(b * o, t)
  seq = jnp.concatenate([rep(tokens), flat.astype(tokens.dtype)], axis=1)
  mask = jnp.concatenate([rep(attention_mask).astype(jnp.int32),
                          jnp.ones((b * o, t), jnp.int32)], axis=1)
  logits, _ = _model(config).apply({"params": params}, seq, images=rep(images),
                                   visual_features=rep(visual_features), attention_mask=mask)
  p = tokens.shape[1]
  logp = jax.nn.log_softmax(logits[:, p - 1:p + t - 1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, flat[..., None], axis=-1)[..., 0].reshape(b, o, t)


# ------------------------------------------------------------------- option trie
# Class names share their first tokens ("golden retriever", "golden eagle"), so
# the options are scored as a prefix tree: each distinct prefix is one node,
# computed once per prompt, and an option's token log-probs are those of the
# nodes on its path. Nodes run in chunks against the ONE prompt cache (no copy
# per option): a chunk is the nodes of a contiguous range of the tree's
# pre-order plus the ancestors of its first node (in pre-order, every ancestor
# outside the range is one of those), each node attending to the prompt, its
# ancestors and itself, at position prompt length + depth. The result equals
# running every option on its own after the prompt.


@dataclasses.dataclass(frozen=True)
class OptionTrie:
  """The options' distinct prefixes as a tree, nodes in pre-order.

  tokens [N]: each node's last token; parent [N]: its parent node (-1: the
  prompt); depth [N]: its position after the prompt (0 = first option token);
  paths [O, T]: each option's nodes, -1 past its length; lengths [O].
  """
  tokens: np.ndarray
  parent: np.ndarray
  depth: np.ndarray
  paths: np.ndarray
  lengths: np.ndarray

  @classmethod
  def build(cls, options: Sequence[Sequence[int]]) -> "OptionTrie":
    """options: non-empty token lists (duplicates share their nodes)."""
    opts = [tuple(int(t) for t in o) for o in options]
    ids: dict = {}
    tokens, parent, depth = [], [], []
    for opt in sorted(set(opts)):  # lexicographic order = pre-order numbering
      node = -1
      for d, tok in enumerate(opt):
        key = (node, tok)
        if key not in ids:
          ids[key] = len(tokens)
          tokens.append(tok)
          parent.append(node)
          depth.append(d)
        node = ids[key]
    t = max(len(o) for o in opts)
    paths = np.full((len(opts), t), -1, np.int64)
    for o, opt in enumerate(opts):
      node = -1
      for d, tok in enumerate(opt):
        node = paths[o, d] = ids[(node, tok)]
    return cls(np.array(tokens, np.int32), np.array(parent, np.int64),
               np.array(depth, np.int32), paths, np.array([len(o) for o in opts]))

  @property
  def num_nodes(self) -> int:
    return len(self.tokens)

  def ancestors(self, node: int) -> list[int]:
    """node's ancestors, root first (not node itself)."""
    out = []
    node = int(self.parent[node])
    while node >= 0:
      out.append(node)
      node = int(self.parent[node])
    return out[::-1]

  def chunks(self, size: int, pad_token_id: int = 0, context: int = 0) -> dict:
    """The nodes in chunks of `size` with their outside ancestors, as arrays [K, L]
    (L = context + size, context >= the deepest node's depth (0: that depth):
    ancestors first, then the chunk's nodes, then padding):

    tokens, depth [K, L]; parent [K, L] the slot of each slot's parent in the
    same sequence (-1: the prompt); allowed [K, L, L] bool: slot i attends to
    slot j (j is i or one of its ancestors); node [K, L]: the node a slot
    scores (-1: an ancestor or padding, scored in another chunk).
    """
    n = self.num_nodes
    deepest = int(self.depth.max())
    if context and context < deepest:
      raise ValueError(f"OptionTrie.chunks: context {context} < the deepest node's {deepest}")
    width = (context or deepest) + size
    starts = range(0, n, size)
    k = len(starts)
    out = {"tokens": np.full((k, width), pad_token_id, np.int32),
           "depth": np.zeros((k, width), np.int32), "parent": np.full((k, width), -1, np.int32),
           "allowed": np.zeros((k, width, width), bool), "node": np.full((k, width), -1, np.int64)}
    for c, start in enumerate(starts):
      nodes = self.ancestors(start) + list(range(start, min(start + size, n)))
      slot = {node: s for s, node in enumerate(nodes)}
      for s, node in enumerate(nodes):
        out["tokens"][c, s] = self.tokens[node]
        out["depth"][c, s] = self.depth[node]
        p = int(self.parent[node])
        out["parent"][c, s] = slot[p] if p >= 0 else -1
        out["allowed"][c, s, s] = True
        a = p
        while a >= 0:
          out["allowed"][c, s, slot[a]] = True
          a = int(self.parent[a])
        if node >= start:
          out["node"][c, s] = node
      for s in range(len(nodes), width):
        out["allowed"][c, s, s] = True  # padding: sees only the prompt and itself
    return out


def _trie_forward(module: Flamingo, tokens, depth, allowed, cache: DecodeCache):
  """The slots of one trie chunk against the prompt cache (`decode.masked_extend`).
  tokens, depth [L]; allowed [L, L] -> logits [B, L, V]."""
  b = cache.key_mask.shape[0]
  length = tokens.shape[0]
  tokens = jnp.broadcast_to(tokens[None], (b, length))
  positions = cache.num_tokens[:, None] + depth[None]  # [B, L]
  rel = jnp.arange(cache.length) - cache.index  # slot s holds chunk slot rel[s]
  new = (rel >= 0) & (rel < length)
  at = jnp.clip(rel, 0, length - 1)
  tree = jnp.where(new[None], allowed[:, at], False)  # [L, S]
  mask = (cache.key_mask & (rel < 0)[None])[:, None, :] | tree[None]  # [B, L, S]
  key_pos = jnp.where(new[None], jnp.take(positions, at, axis=1),
                      default_positions(cache.key_mask, b, cache.length))
  # Options hold no <image> nor reset token: every slot sees the prompt's last image.
  phi = jnp.broadcast_to(jnp.where(cache.image_reset, 0, cache.image_count)[:, None],
                         (b, length))
  logits, _ = masked_extend(module, tokens, positions, mask, key_pos, phi, cache)
  return logits


def trie_logprobs(params, next_logp, cache: DecodeCache, tokens, depth, parent, allowed, *,
                  config: FlamingoConfig):
  """log p of each slot's token of one trie chunk (`OptionTrie.chunks`) given the prompt
  and the slot's ancestors. next_logp [B, V] and cache from `encode_prompts` (room
  for L slots); tokens, depth, parent [L], allowed [L, L]. Returns [B, L] float32."""
  logits = _model(config).apply({"params": params}, tokens, depth, allowed, cache,
                                method=_trie_forward).astype(jnp.float32)  # [B, L, V]
  # log p(token | parent) = logit - logsumexp at the parent's slot: no [B, L, V] log-softmax.
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
  rows = jnp.clip(parent, 0, None)
  picked = logits[:, rows, tokens] - lse[:, rows]  # [B, L]
  first = jnp.take(next_logp, tokens, axis=1)  # the prompt is the parent
  return jnp.where(parent[None] < 0, first, picked)


def _score_chunk(params, next_logp, cache, chunk, *, config: FlamingoConfig):
  """`trie_logprobs` of one chunk given as a dict of its host arrays (so a placement
  keeps them whole: they are not batch-major)."""
  return trie_logprobs(params, next_logp, cache, chunk["tokens"], chunk["depth"],
                       chunk["parent"], chunk["allowed"], config=config)


def _make_fns(config: FlamingoConfig, max_option_length: int, shardings=None):
  """(jit(encode_prompts) with room for one chunk width, jit(_score_chunk));
  shardings: None or (param shardings, data sharding)."""
  encode = functools.partial(encode_prompts, config=config,
                             max_option_length=max_option_length)
  kw = {}
  if shardings is not None:
    params, data = shardings
    kw["in_shardings"] = (params, data, data, data, data)
  return (jax.jit(encode, **kw), jax.jit(functools.partial(_score_chunk, config=config)))


@functools.lru_cache(maxsize=None)
def _shared_fns(config: FlamingoConfig, max_option_length: int):
  """`_make_fns` without shardings, shared across Scorers so compilations are reused."""
  return _make_fns(config, max_option_length)


@functools.lru_cache(maxsize=8)
def _trie_chunks(options: tuple, size: int, context: int, pad_token_id: int):
  """(OptionTrie, its chunks) for a tuple of option tuples; a task's class names come
  back with every batch, so they are built once."""
  trie = OptionTrie.build(options)
  return trie, trie.chunks(size, pad_token_id, context=context)


class Scorer:
  """Scores a shared list of options after each of many prompts, on the host side.

  Prompts are left padded to a length bucket in fixed-size batches (as in
  `decode.Generator`) and encoded once; the options' prefix tree then runs
  `option_chunk` nodes at a time against that one cache (the chunk's ancestor
  slots padded to an `option_buckets` length, so a run compiles once per
  prompt bucket). Options may not contain `<image>` or the image reset token.
  """

  def __init__(self, config: FlamingoConfig, *, batch_size: int = 8,
               prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
               option_buckets: Sequence[int] = (4, 8, 16, 32, 64), option_chunk: int = 64,
               pad_token_id: int = 0, param_shardings: Any = None, data_sharding: Any = None,
               placement: Optional[Placement] = None):
    if batch_size < 1 or option_chunk < 1:
      raise ValueError(f"batch_size and option_chunk must be >= 1, got {batch_size} and "
                       f"{option_chunk}")
    self.config, self.batch_size, self.option_chunk = config, batch_size, option_chunk
    self.prompt_buckets, self.option_buckets = tuple(prompt_buckets), tuple(option_buckets)
    self.pad_token_id = pad_token_id
    self._shardings = None
    self.placement = placement or Placement()
    if placement is not None and placement.mesh is not None:
      param_shardings, data_sharding = placement.param_shardings, placement.data_sharding
    if param_shardings is not None or data_sharding is not None:
      self._shardings = (param_shardings, data_sharding)
    self._own_fns: dict = {}

  def _fns(self, max_option_length: int):
    if self._shardings is None:
      return _shared_fns(self.config, max_option_length)
    if max_option_length not in self._own_fns:
      self._own_fns[max_option_length] = _make_fns(self.config, max_option_length,
                                                   self._shardings)
    return self._own_fns[max_option_length]

  def token_logprobs(self, params, prompts: Sequence[Sequence[int]],
                     options: Sequence[Sequence[int]],
                     images: Optional[Sequence[Optional[np.ndarray]]] = None, *,
                     visual_features: Optional[Sequence[Optional[np.ndarray]]] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """-> (log p [len(prompts), O, T] float32, lengths [O]) for options shared by all
    prompts (T = the longest option; 0 past an option's length).

    images: per prompt [N_i, T, H, W, 3] (N_i = its `<image>` count) or None;
    or visual_features: per prompt [N_i, T, S, C] frozen vision features.
    """
    c = self.config
    if not prompts:
      raise ValueError("Scorer: no prompts")
    if not options or any(len(opt) == 0 for opt in options):
      raise ValueError("Scorer: options must be a non-empty list of non-empty token lists")
    special = {c.image_token_id, c.image_reset_token_id}
    bad = next((i for i, opt in enumerate(options) if special & set(opt)), None)
    if bad is not None:
      raise ValueError(f"Scorer: option {bad} contains the <image> or image reset token "
                       f"(ids {sorted(t for t in special if t >= 0)}); options are text only")
    counts = count_image_tokens(prompts, c.image_token_id)
    as_features = visual_features is not None
    images = check_image_counts(prompts, counts, visual_features if as_features else images)
    key = tuple(tuple(int(t) for t in opt) for opt in options)
    longest = max(len(opt) for opt in key)
    trie, chunks = _trie_chunks(key, self.option_chunk, bucket(longest, self.option_buckets),
                                self.pad_token_id)
    encode, score = self._fns(chunks["tokens"].shape[1])
    slots = max(counts)
    length = bucket(max(len(p) for p in prompts), self.prompt_buckets)
    paths = np.where(trie.paths >= 0, trie.paths, trie.num_nodes)  # past the end: a zero
    out = np.zeros((len(prompts), len(options), longest), np.float32)
    for start in range(0, len(prompts), self.batch_size):
      idx = list(range(start, min(start + self.batch_size, len(prompts))))
      real = len(idx)
      idx += [idx[0]] * (self.batch_size - real)
      tokens, mask = left_pad([prompts[i] for i in idx], length, self.pad_token_id)
      imgs = stack_images([images[i] for i in idx], slots) if slots else None
      visual = (None, imgs) if as_features else (imgs, None)
      next_logp, cache = self.placement.run(encode, params, tokens, mask, *visual)
      pending = [self.placement.run(score, params, next_logp, cache,
                                    {k: chunks[k][j] for k in ("tokens", "depth", "parent",
                                                               "allowed")})
                 for j in range(len(chunks["tokens"]))]  # dispatched before any is read
      nodes = np.zeros((self.batch_size, trie.num_nodes + 1), np.float32)
      for j, lp in enumerate(self.placement.fetch(pending)):
        keep = chunks["node"][j] >= 0
        nodes[:, chunks["node"][j][keep]] = np.asarray(lp)[:, keep]
      out[start:start + real] = nodes[:real][:, paths]
    return out, trie.lengths

  def __call__(self, params, prompts: Sequence[Sequence[int]],
               options: Sequence[Sequence[int]],
               images: Optional[Sequence[Optional[np.ndarray]]] = None, *,
               normalize: bool = True,
               visual_features: Optional[Sequence[Optional[np.ndarray]]] = None) -> np.ndarray:
    """[len(prompts), O] option scores (`classification.option_scores`)."""
    logp, lengths = self.token_logprobs(params, prompts, options, images,
                                        visual_features=visual_features)
    return classification.option_scores(
        logp, np.broadcast_to(lengths, logp.shape[:2]), normalize=normalize)
