"""Autoregressive generation: greedy, beam search and sampling, jit-compiled.

The vision encoder, the resampler and each cross-attention block's visual
keys/values run once per prompt (`Flamingo.prefill`); every new token is one
`Flamingo.extend` against the cached self-attention keys/values (the peers
recompute the cross-attention keys/values at every step). The search loops
are `lax.while_loop`s over a fixed [B, max_new_tokens] buffer that stop when
every row has emitted a stop token (`<EOC>`, plus `stop_token_ids`).

Beam search keeps ONE cache row per prompt: the K beams' new tokens go to
their own slots and each beam attends to the prompt and its own earlier
slots (`masked_extend`), so reordering beams moves a table of slot numbers,
never the cache.

`generate` is a pure function of (params, arrays) with the configs static, so
it jits and shards like any other step. `Generator` is the host-side wrapper:
it left-pads prompts into fixed length buckets and fixed-size batches, so a
whole evaluation compiles once per (prompt bucket, image slots).

Beam search follows Hugging Face's (what OpenFlamingo evaluates with): each
step takes the 2K best (beam, token) continuations; a stop token among the
first K finishes a hypothesis scored sum(log p) / length ** length_penalty
(length = generated tokens, stop token included); the first K others keep
running; an example is done once it has K finished hypotheses and the best
running one cannot beat the worst of them.

`use_cache=False` is the reference and the benchmark baseline: the full
forward over the whole sequence for every new token (the vision encoder
still runs once per prompt).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models import masking
from flamingo_jax.models.flamingo import DecodeCache, Flamingo
from flamingo_jax.models.lm import default_positions

METHODS = ("greedy", "beam", "sample")
# Prompt lengths: steps of 16 to 256 tokens, then 32, 64 and 256, so padding costs the
# prompt pass at most ~1/8 (a 4-shot COCO prompt of 68 tokens runs 80, not 128).
DEFAULT_BUCKETS = (tuple(range(16, 257, 16)) + tuple(range(288, 513, 32))
                   + tuple(range(576, 1025, 64)) + (1280, 1536, 1792, 2048))
NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to pick new tokens. Paper and OpenFlamingo: beam 3, stop at `<EOC>`."""
  method: str = "beam"  # greedy | beam | sample
  max_new_tokens: int = 20  # OpenFlamingo: 20 for captions, 5 for VQA, 10 for TextVQA
  min_new_tokens: int = 0  # stop tokens are banned before this many (benchmarks: = max)
  num_beams: int = 3
  length_penalty: float = 0.0  # OpenFlamingo's evaluation value
  temperature: float = 1.0  # sample only
  top_k: int = 0  # sample only; 0: off
  top_p: float = 1.0  # sample only; 1.0: off
  stop_token_ids: tuple[int, ...] = ()  # stop tokens besides <EOC> (e.g. EOS)
  # `<image>` has no image to go with it in a continuation, so it is never generated.
  suppress_image_token: bool = True
  # Generate only ids below this (the tokenizer's vocabulary); 0: every id.
  vocab_limit: int = 0
  pad_token_id: int = 0  # written after the stop token
  use_cache: bool = True  # False: full forward per token (reference, benchmarks)
  # True: the cache holds the visual tokens and every step recomputes the
  # cross-attention keys/values from them (what OpenFlamingo does; benchmarks).
  recompute_cross_kv: bool = False

  def validate(self, config: FlamingoConfig) -> None:
    """ValueError naming the bad field."""
    if self.method not in METHODS:
      raise ValueError(f"decode method {self.method!r} is not one of {METHODS}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not 0 <= self.min_new_tokens <= self.max_new_tokens:
      raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                       f"got {self.min_new_tokens}")
    if self.method == "beam" and self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if self.method == "sample":
      if not self.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {self.temperature}")
      if self.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
      if not 0 < self.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    vocab = config.lm.vocab_size
    if not 0 <= self.vocab_limit <= vocab:
      raise ValueError(f"vocab_limit must be in [0, {vocab}], got {self.vocab_limit}")
    for tid in (*self.stop_token_ids, self.pad_token_id):
      if not 0 <= tid < vocab:
        raise ValueError(f"token id {tid} (stop_token_ids / pad_token_id) is outside the "
                         f"vocabulary [0, {vocab})")
    limit = self.vocab_limit or vocab
    if config.eoc_token_id >= limit:
      raise ValueError(f"<EOC> (id {config.eoc_token_id}) is at or above vocab_limit "
                       f"{limit}, so decoding could never stop")
    if not self.use_cache and self.recompute_cross_kv:
      raise ValueError("recompute_cross_kv needs use_cache=True (it keeps the self-attention "
                       "cache and drops only the cross-attention one)")


class Generation(NamedTuple):
  tokens: jax.Array  # [B, M] int32 new tokens, pad_token_id after the stop token
  lengths: jax.Array  # [B] int32 new tokens up to and including the stop token
  scores: jax.Array  # [B] float32: sum log p (beam: divided by length ** length_penalty)


# ----------------------------------------------------------------------------- steppers
# A stepper hides how logits are made: `init` runs the prompt, `step` appends
# one token per row, `take` selects rows (beam reordering). State is a pytree.


class _Stepper(NamedTuple):
  init: Any  # () -> (logits [B, V], state)
  step: Any  # (state, tokens [R]) -> (logits [R, V], state)
  take: Any  # (state, rows [R'], within_prompt: bool) -> state


def _cached_stepper(model: Flamingo, params, tokens, mask, images, features, latents,
                    max_new: int, recompute_cross_kv: bool) -> _Stepper:
  variables = {"params": params}

  def init():
    logits, cache = model.apply(variables, tokens, images, features, mask,
                                cache_length=tokens.shape[1] + max_new,
                                cache_cross_kv=not recompute_cross_kv, visual_latents=latents,
                                method="prefill")
    return logits[:, -1], cache

  def step(cache: DecodeCache, new):
    logits, cache = model.apply(variables, new[:, None], cache, method="extend")
    return logits[:, 0], cache

  def take(cache: DecodeCache, rows, within_prompt):
    return cache.take_rows(rows, cross=not within_prompt)

  return _Stepper(init, step, take)


def masked_extend(module: Flamingo, tokens, positions, mask, key_positions, phi,
                  cache: DecodeCache):
  """`Flamingo.extend` under the caller's self-attention mask: for tokens that share a
  prefix cache but not each other's history (beams of one prompt, the prefix tree of
  close-ended options), so the cache is never copied per hypothesis.

  tokens, positions, phi [B, L] (phi: each token's image index); mask [B, L, S] bool
  over all S cache slots (the L new keys are written at slots index..index+L-1);
  key_positions [B, S]: each slot's token position (for a sliding window). Returns
  (logits [B, L, V], the cache with index += L); num_tokens, image_count and
  image_reset are the caller's to track.
  """
  c = module.config
  b, length = tokens.shape
  if c.lm.sliding_window:
    mask = mask & (positions[:, :, None] - key_positions[:, None, :] < c.lm.sliding_window)
  logits, keys, values = module.extend_layers(tokens, positions, mask[:, None], phi, cache)
  key_mask = jax.lax.dynamic_update_slice(cache.key_mask, jnp.ones((b, length), bool),
                                          (0, cache.index))
  return logits, cache.replace(keys=keys, values=values, key_mask=key_mask,
                               index=cache.index + length)


class _TreeState(NamedTuple):
  cache: DecodeCache  # one row per prompt: the prompt, then K slots per fed step
  slots: jax.Array  # [R, M] int32: the slots of each hypothesis' fed tokens, -1 after
  fed: jax.Array  # [] int32: steps fed so far
  image_count: jax.Array  # [R] int32: `<image>` tokens so far (prompt and hypothesis)
  image_reset: jax.Array  # [R] bool


def _tree_stepper(model: Flamingo, params, tokens, mask, images, features, latents,
                  max_new: int, beams: int) -> _Stepper:
  """Beam search on ONE cache row per prompt: step n writes the K beams' tokens at
  slots P + n K .. P + n K + K - 1 and each beam attends to the prompt and its own
  earlier slots (`masked_extend`), so reordering the beams moves the [R, M] slot
  table, not the cache (the flat stepper copies every row's keys/values each step)."""
  variables = {"params": params}
  b, p = tokens.shape
  k, c = beams, model.config
  length = p + k * max(max_new - 1, 0)

  def init():
    logits, cache = model.apply(variables, tokens, images, features, mask,
                                cache_length=length, visual_latents=latents, method="prefill")
    state = _TreeState(cache, jnp.full((b, max(max_new - 1, 1)), -1, jnp.int32),
                       jnp.zeros((), jnp.int32), cache.image_count, cache.image_reset)
    return logits[:, -1], state

  def step(state: _TreeState, new):
    cache = state.cache
    own = p + state.fed * k + jnp.arange(k, dtype=jnp.int32)  # [K]
    slots = state.slots.at[:, state.fed].set(jnp.tile(own, b))
    ids = jnp.arange(length, dtype=jnp.int32)
    mine = (ids[None, :, None] == slots[:, None, :]).any(-1).reshape(b, k, length)
    prompt = cache.key_mask & (ids < p)[None]  # [B, S]
    attend = prompt[:, None, :] | mine
    start = cache.num_tokens  # [B]: the first new token's position
    key_pos = jnp.where(ids[None] < p, default_positions(cache.key_mask, b, length),
                        start[:, None] + (ids[None] - p) // k)
    positions = jnp.broadcast_to((start + state.fed)[:, None], (b, k))
    is_image = new == c.image_token_id
    phi = state.image_count + is_image
    reset = state.image_reset
    if c.image_reset_token_id >= 0:
      is_reset = new == c.image_reset_token_id
      cut, reset = masking.after_reset(is_image[:, None], is_reset[:, None], state.image_reset)
      phi = jnp.where(cut[:, 0], 0, phi)
    logits, cache = model.apply(variables, new.reshape(b, k), positions, attend, key_pos,
                                phi.reshape(b, k), cache, method=masked_extend)
    return logits.reshape(b * k, -1), _TreeState(
        cache, slots, state.fed + 1, state.image_count + is_image, reset)

  def take(state: _TreeState, rows, within_prompt):
    return state._replace(slots=state.slots[rows], image_count=state.image_count[rows],
                          image_reset=state.image_reset[rows])

  return _Stepper(init, step, take)


def _full_forward_stepper(model: Flamingo, params, tokens, mask, images, features, latents,
                          max_new: int) -> _Stepper:
  """The reference: every step runs `Flamingo.__call__` over the whole buffer."""
  variables = {"params": params}
  b, length = tokens.shape
  visual = "visual_features" if latents is None else "visual_latents"

  def logits_at(state, pos):
    buf, buf_mask, feats, _ = state
    logits, _ = model.apply(variables, buf, attention_mask=buf_mask, **{visual: feats})
    return jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False)

  def init():
    feats = features if latents is None else latents
    if images is not None:  # the vision encoder once per prompt, as in OpenFlamingo
      feats = model.apply(variables, images, method="encode_images")
    buf = jnp.concatenate([tokens, jnp.zeros((b, max_new), tokens.dtype)], axis=1)
    buf_mask = jnp.concatenate([mask.astype(jnp.int32), jnp.zeros((b, max_new), jnp.int32)], 1)
    state = (buf, buf_mask, feats, jnp.asarray(length, jnp.int32))
    return logits_at(state, length - 1), state

  def step(state, new):
    buf, buf_mask, feats, pos = state
    buf = jax.lax.dynamic_update_slice(buf, new[:, None].astype(buf.dtype), (0, pos))
    buf_mask = jax.lax.dynamic_update_slice(buf_mask, jnp.ones((buf.shape[0], 1), jnp.int32),
                                            (0, pos))
    state = (buf, buf_mask, feats, pos + 1)
    return logits_at(state, pos), state

  def take(state, rows, within_prompt):
    buf, buf_mask, feats, pos = state
    pick = lambda a: None if a is None else jnp.take(a, rows, axis=0)  # noqa: E731
    return (pick(buf), pick(buf_mask), pick(feats), pos)

  return _Stepper(init, step, take)


# ------------------------------------------------------------------------------ search


def _stop_ids(config: FlamingoConfig, options: DecodeConfig) -> jax.Array:
  return jnp.asarray((config.eoc_token_id,) + tuple(options.stop_token_ids), jnp.int32)


def _allowed(logits, config: FlamingoConfig, options: DecodeConfig, step):
  """-inf at ids that may not be generated at new token `step` (`<image>`, ids
  beyond vocab_limit, stop tokens before min_new_tokens)."""
  vocab = logits.shape[-1]
  ids = jnp.arange(vocab)
  banned = jnp.zeros((vocab,), bool)
  if options.vocab_limit:
    banned = banned | (ids >= options.vocab_limit)
  if options.suppress_image_token:
    banned = banned | (ids == config.image_token_id)
  if options.min_new_tokens:
    banned = banned | (jnp.isin(ids, _stop_ids(config, options)) & (step < options.min_new_tokens))
  return jnp.where(banned, NEG_INF, logits)


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Temperature, then top-k, then nucleus (top-p) filtering; removed ids get -inf.

  logits [..., V] -> [..., V]. top-p keeps the smallest set of the most likely
  ids whose probability reaches top_p (always at least the most likely one).
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely ids
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


def _sample_search(stepper: _Stepper, config: FlamingoConfig, options: DecodeConfig,
                   rng) -> Generation:
  """Greedy or sampling: one row per prompt."""
  stops = _stop_ids(config, options)
  max_new, pad = options.max_new_tokens, options.pad_token_id

  def choose(logits, i):
    logits = _allowed(logits.astype(jnp.float32), config, options, i)
    logp = jax.nn.log_softmax(logits, axis=-1)
    if options.method == "greedy":
      tok = jnp.argmax(logits, axis=-1)
    else:
      tok = jax.random.categorical(
          jax.random.fold_in(rng, i),
          filter_logits(logits, options.temperature, options.top_k, options.top_p), axis=-1)
    tok = tok.astype(jnp.int32)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]

  logits, state = stepper.init()
  b = logits.shape[0]
  tok, logp = choose(logits, 0)
  out = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(tok)
  carry = (jnp.asarray(1, jnp.int32), out, jnp.isin(tok, stops), jnp.ones((b,), jnp.int32),
           logp, tok, state)

  def cond(carry):
    i, _, done = carry[:3]
    return (i < max_new) & ~jnp.all(done)

  def body(carry):
    i, out, done, lengths, score, prev, state = carry
    logits, state = stepper.step(state, prev)
    tok, logp = choose(logits, i)
    tok = jnp.where(done, pad, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    score = score + jnp.where(done, 0.0, logp)
    lengths = lengths + (~done).astype(jnp.int32)
    return (i + 1, out, done | jnp.isin(tok, stops), lengths, score, tok, state)

  _, out, _, lengths, score, _, _ = jax.lax.while_loop(cond, body, carry)
  return Generation(out, lengths, score)


def _beam_search(stepper: _Stepper, config: FlamingoConfig, options: DecodeConfig
                 ) -> Generation:
  k, max_new, pad = options.num_beams, options.max_new_tokens, options.pad_token_id
  stops = _stop_ids(config, options)
  penalty = options.length_penalty

  logits, state = stepper.init()
  b, vocab = logits.shape
  state = stepper.take(state, jnp.repeat(jnp.arange(b), k), False)  # prompt -> K beams
  logits = jnp.repeat(logits, k, axis=0)
  run_tokens = jnp.full((b, k, max_new), pad, jnp.int32)
  run_scores = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF), (b, 1))
  fin_tokens = jnp.full((b, k, max_new), pad, jnp.int32)
  fin_scores = jnp.full((b, k), NEG_INF, jnp.float32)
  fin_lengths = jnp.zeros((b, k), jnp.int32)
  done = jnp.zeros((b,), bool)

  def select(i, logits, run_tokens, run_scores, fin_tokens, fin_scores, fin_lengths, done):
    logits = _allowed(logits.astype(jnp.float32), config, options, i)
    logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab)
    cand = (run_scores[..., None] + logp).reshape(b, k * vocab)
    vals, idx = jax.lax.top_k(cand, 2 * k)  # best first
    beam, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(run_tokens, beam[..., None], axis=1)  # [B, 2K, M]
    seqs = jax.lax.dynamic_update_slice(seqs, tok[..., None], (0, 0, i))
    length = (i + 1).astype(jnp.float32)
    norm = length ** penalty
    is_stop = jnp.isin(tok, stops)
    # Finished: stop tokens among the K best continuations (as Hugging Face).
    add = is_stop & (jnp.arange(2 * k) < k)[None] & ~done[:, None] & (vals > NEG_INF)
    scores = jnp.concatenate([fin_scores, jnp.where(add, vals / norm, NEG_INF)], axis=1)
    fin_scores, pick = jax.lax.top_k(scores, k)
    fin_tokens = jnp.take_along_axis(jnp.concatenate([fin_tokens, seqs], 1), pick[..., None], 1)
    lengths = jnp.concatenate([fin_lengths, jnp.full((b, 2 * k), i + 1, jnp.int32)], 1)
    fin_lengths = jnp.take_along_axis(lengths, pick, 1)
    # Running: the K best continuations that did not stop.
    run_scores, pick = jax.lax.top_k(jnp.where(is_stop, NEG_INF, vals), k)
    run_tokens = jnp.take_along_axis(seqs, pick[..., None], axis=1)
    next_tok = jnp.take_along_axis(tok, pick, 1)
    source = jnp.take_along_axis(beam, pick, 1)
    full = fin_scores[:, -1] > NEG_INF
    done = done | (full & (fin_scores[:, -1] >= run_scores[:, 0] / norm))
    rows = (jnp.arange(b)[:, None] * k + source).reshape(-1)
    return (run_tokens, run_scores, fin_tokens, fin_scores, fin_lengths, done,
            next_tok.reshape(-1), rows)

  zero = jnp.asarray(0, jnp.int32)
  *search, next_tok, rows = select(zero, logits, run_tokens, run_scores, fin_tokens, fin_scores,
                                   fin_lengths, done)
  carry = (zero + 1, tuple(search), next_tok, rows, state)

  def cond(carry):
    i, search = carry[:2]
    return (i < max_new) & ~jnp.all(search[-1])

  def body(carry):
    i, search, next_tok, rows, state = carry
    state = stepper.take(state, rows, True)
    logits, state = stepper.step(state, next_tok)
    *search, next_tok, rows = select(i, logits, *search)
    return (i + 1, tuple(search), next_tok, rows, state)

  steps, search, _, _, _ = jax.lax.while_loop(cond, body, carry)
  run_tokens, run_scores, fin_tokens, fin_scores, fin_lengths, done = search
  # Examples still running at the end: their running beams compete too.
  norm = steps.astype(jnp.float32) ** penalty
  extra = jnp.where(done[:, None], NEG_INF, run_scores / norm)
  scores = jnp.concatenate([fin_scores, extra], axis=1)
  best = jnp.argmax(scores, axis=1)
  tokens = jnp.concatenate([fin_tokens, run_tokens], axis=1)
  tokens = jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]
  lengths = jnp.concatenate([fin_lengths, jnp.broadcast_to(steps, (b, k))], axis=1)
  lengths = jnp.take_along_axis(lengths, best[:, None], axis=1)[:, 0]
  return Generation(tokens, lengths, jnp.take_along_axis(scores, best[:, None], 1)[:, 0])


def generate(params, tokens, attention_mask, images=None, visual_features=None, rng=None,
             visual_latents=None, *, config: FlamingoConfig, options: DecodeConfig
             ) -> Generation:
  """New tokens for each prompt.

  tokens [B, P] int32, left padded (attention_mask [B, P], 1 = real token, or
  None: no padding);
  images [B, N, T, H, W, 3], visual_features [B, N, T, S, C] or visual_latents
  [B, N, n, D_r] (the resampler's output, `features.FeatureCache.latents`), or
  none: text only; rng: a key for method="sample". Pure: jit it with config and
  options static (`Generator` does, with buckets).
  """
  options.validate(config)
  model = Flamingo(dataclasses.replace(config, remat="none"))
  if attention_mask is None:
    attention_mask = jnp.ones(tokens.shape, jnp.int32)
  if options.use_cache and options.method == "beam" and not options.recompute_cross_kv:
    stepper = _tree_stepper(model, params, tokens, attention_mask, images, visual_features,
                            visual_latents, options.max_new_tokens, options.num_beams)
  elif options.use_cache:
    stepper = _cached_stepper(model, params, tokens, attention_mask, images, visual_features,
                              visual_latents, options.max_new_tokens, options.recompute_cross_kv)
  else:
    stepper = _full_forward_stepper(model, params, tokens, attention_mask, images,
                                    visual_features, visual_latents, options.max_new_tokens)
  if options.method == "beam":
    return _beam_search(stepper, config, options)
  if options.method == "sample" and rng is None:
    raise ValueError("method='sample' needs an rng key")
  return _sample_search(stepper, config, options, rng)


# ------------------------------------------------------------------------------ host side


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n; beyond the last, the next multiple of the last."""
  if n < 1:
    raise ValueError(f"bucket: need n >= 1, got {n}")
  for b in sorted(buckets):
    if b >= n:
      return b
  top = max(buckets)
  return -(-n // top) * top


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens [B, length] int32, attention_mask [B, length] int32), left padded."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    if not 0 < len(p) <= length:
      raise ValueError(f"prompt {i} has {len(p)} tokens; need 1..{length}")
    tokens[i, length - len(p):] = p
    mask[i, length - len(p):] = 1
  return tokens, mask


def stack_images(images: Sequence[Optional[np.ndarray]], slots: int) -> np.ndarray:
  """Per-prompt images [N_i, T, H, W, 3] -> [B, slots, T, H, W, 3], zeros in unused slots
  (features [N_i, T, S, C] and latents [N_i, n, D_r] alike).

  No token refers to an unused slot, so its content never reaches the text.
  """
  shapes = {tuple(np.shape(x)[1:]) for x in images if x is not None and len(x)}
  if len(shapes) != 1:
    raise ValueError(f"all images (features, latents) must share one shape per slot, got "
                     f"{sorted(shapes)}")
  (shape,) = shapes
  out = np.zeros((len(images), slots) + shape, np.float32)
  for i, x in enumerate(images):
    if x is not None and len(x):
      out[i, :len(x)] = x
  return out


def count_image_tokens(prompts: Sequence[Sequence[int]], image_token_id: int) -> list[int]:
  return [sum(1 for t in p if t == image_token_id) for p in prompts]


def check_image_counts(prompts: Sequence, counts: Sequence[int],
                       images: Optional[Sequence[Optional[np.ndarray]]]) -> list:
  """Per prompt images (or features) whose count matches its `<image>` tokens."""
  if images is None:
    images = [None] * len(prompts)
  if len(images) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
  for i, (n, x) in enumerate(zip(counts, images)):
    have = 0 if x is None else len(x)
    if n != have:
      raise ValueError(f"prompt {i} has {n} <image> tokens but {have} images")
  return list(images)


class Placement:
  """Where the evaluation's arrays live: one device (mesh None), or a mesh with
  the params in their tensor / FSDP shardings and each batch split over the
  data-parallel axes. `run` calls a jitted function under the mesh and the
  logical-axis rules; `fetch` brings results to the host (gathered from every
  process on a multi-host mesh)."""

  def __init__(self, mesh=None, rules=(), param_shardings: Any = None):
    self.mesh, self.rules, self.param_shardings = mesh, tuple(rules), param_shardings
    self.data_sharding = None
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec
      from flamingo_jax.runtime.sharding import BATCH_AXES
      self.data_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
      self.replicated = NamedSharding(mesh, PartitionSpec())

  @classmethod
  def of(cls, params, mesh=None, mesh_cfg=None) -> "Placement":
    """The placement of params already laid out on `mesh` (model_dir.load): their own
    shardings under mesh_cfg's logical-axis rules (a MeshConfig); one device without
    a mesh."""
    if mesh is None:
      return cls()
    return cls(mesh, mesh_cfg.rules, jax.tree.map(lambda p: p.sharding, params))

  @property
  def batch_shards(self) -> int:
    if self.mesh is None:
      return 1
    from flamingo_jax.runtime.sharding import batch_shards
    return batch_shards(self.mesh)

  def put(self, x):
    """A host batch [B, ...] (the same on every process) -> a global array split over
    the data-parallel axes (replicated when B does not divide)."""
    if self.mesh is None or not isinstance(x, np.ndarray):
      return x
    sharding = self.data_sharding if x.ndim and x.shape[0] % self.batch_shards == 0 \
        else self.replicated
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def run(self, fn, *args):
    if self.mesh is None:
      return fn(*args)
    import flax.linen as nn
    args = [self.put(a) for a in args]
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return fn(*args)

  def fetch(self, tree):
    if self.mesh is None or jax.process_count() == 1:
      return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
                        tree)


@functools.lru_cache(maxsize=None)
def compiled_generate(config: FlamingoConfig, options: DecodeConfig):
  """jit(generate) for (config, options), shared so its compilations are reused."""
  return jax.jit(functools.partial(generate, config=config, options=options))


class Generator:
  """Bucketed, compiled `generate` over lists of token prompts and their images.

  Prompts are left padded to a length bucket and grouped into batches of
  `batch_size` (the last one filled with copies), and the image slots are
  padded to the largest count in the call, so a run compiles once per
  (length bucket, image slots). param_shardings / data_sharding (optional)
  place the params and the batch (e.g. `NamedSharding(mesh, P("data"))`).
  """

  def __init__(self, config: FlamingoConfig, options: DecodeConfig, *, batch_size: int = 8,
               prompt_buckets: Sequence[int] = DEFAULT_BUCKETS, param_shardings: Any = None,
               data_sharding: Any = None, placement: Optional["Placement"] = None):
    options.validate(config)
    self.placement = placement or Placement()
    if placement is not None and placement.mesh is not None:
      param_shardings, data_sharding = placement.param_shardings, placement.data_sharding
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompt_buckets or min(prompt_buckets) < 1:
      raise ValueError(f"prompt_buckets must be positive lengths, got {prompt_buckets}")
    self.config, self.options, self.batch_size = config, options, batch_size
    self.prompt_buckets = tuple(prompt_buckets)
    if param_shardings is None and data_sharding is None:
      self._fn = compiled_generate(config, options)
    else:
      self._fn = jax.jit(functools.partial(generate, config=config, options=options),
                         in_shardings=(param_shardings, data_sharding, data_sharding,
                                       data_sharding, data_sharding, None, data_sharding))

  def __call__(self, params, prompts: Sequence[Sequence[int]],
               images: Optional[Sequence[Optional[np.ndarray]]] = None, rng=None, *,
               visual_features: Optional[Sequence[Optional[np.ndarray]]] = None,
               visual_latents: Optional[Sequence[Optional[np.ndarray]]] = None
               ) -> list[list[int]]:
    """Token lists -> generated token lists (without the stop token and padding).

    images: per prompt [N_i, T, H, W, 3] float32 (N_i = its `<image>` count) or
    None for text-only prompts; or visual_features: per prompt the frozen
    vision features [N_i, T, S, C] (`features.FeatureCache`) instead; or
    visual_latents: per prompt the resampled tokens [N_i, n, D_r]
    (`FeatureCache.latents`).
    """
    c = self.config
    if not prompts:
      return []
    counts = count_image_tokens(prompts, c.image_token_id)
    given = [k for k, v in (("images", images), ("visual_features", visual_features),
                            ("visual_latents", visual_latents)) if v is not None]
    if len(given) > 1:
      raise ValueError(f"pass one of images, visual_features and visual_latents, not "
                       f"{' and '.join(given)}")
    kind = given[0] if given else "images"
    images = check_image_counts(prompts, counts, {"images": images,
                                                  "visual_features": visual_features,
                                                  "visual_latents": visual_latents}[kind])
    slots = max(counts)
    length = bucket(max(len(p) for p in prompts), self.prompt_buckets)
    if rng is None:
      rng = jax.random.key(0)
    out = []
    for start in range(0, len(prompts), self.batch_size):
      idx = list(range(start, min(start + self.batch_size, len(prompts))))
      idx += [idx[0]] * (self.batch_size - len(idx))  # fixed batch shape
      tokens, mask = left_pad([prompts[i] for i in idx], length, self.options.pad_token_id)
      imgs = stack_images([images[i] for i in idx], slots) if slots else None
      visual = {k: imgs if k == kind else None
                for k in ("images", "visual_features", "visual_latents")}
      result = self.placement.run(self._fn, params, tokens, mask, visual["images"],
                                  visual["visual_features"], jax.random.fold_in(rng, start),
                                  visual["visual_latents"])
      toks, lengths = self.placement.fetch((result.tokens, result.lengths))
      stops = set((c.eoc_token_id,) + tuple(self.options.stop_token_ids))
      for row in range(min(self.batch_size, len(prompts) - start)):
        seq = [int(t) for t in toks[row, :lengths[row]]]
        if seq and seq[-1] in stops:
          seq = seq[:-1]
        out.append(seq)
    return out
