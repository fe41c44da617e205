"""Close-ended scoring: the log-likelihood of each option after a shared prompt.

ImageNet has 1000 class names to rank after one prompt, so the prompt (its
images, the resampler, the cross-attention keys/values and the self-attention
keys/values of every prompt token) is encoded once (`Flamingo.prefill`), and
each option only runs its own tokens against copies of that cache
(`Flamingo.extend`), a chunk of options at a time. The uncached reference
(`use_cache=False`) runs the full forward over prompt + option for every
option. Scores are `classification.option_scores` of the per-token
log-probabilities: the mean per token by default (OpenFlamingo's
length normalisation), the sum with normalize=False.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.config import FlamingoConfig
from flamingo_jax.evaluate import classification
from flamingo_jax.evaluate.decode import (DEFAULT_BUCKETS, Placement, bucket,
                                          check_image_counts, count_image_tokens, left_pad,
                                          stack_images)
from flamingo_jax.models.flamingo import DecodeCache, Flamingo


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


def _make_fns(config: FlamingoConfig, max_option_length: int, shardings=None):
  """(jit(encode_prompts) for one option length bucket, jit(continuation_logprobs));
  shardings: None or (param shardings, data sharding)."""
  encode = functools.partial(encode_prompts, config=config,
                             max_option_length=max_option_length)
  kw = {}
  if shardings is not None:
    params, data = shardings
    kw["in_shardings"] = (params, data, data, data, data)
  return (jax.jit(encode, **kw),
          jax.jit(functools.partial(continuation_logprobs, config=config)))


@functools.lru_cache(maxsize=None)
def _shared_fns(config: FlamingoConfig, max_option_length: int):
  """`_make_fns` without shardings, shared across Scorers so compilations are reused."""
  return _make_fns(config, max_option_length)


class Scorer:
  """Scores a shared list of options after each of many prompts, on the host side.

  Prompts are left padded to a length bucket in fixed-size batches (as in
  `decode.Generator`); options are right padded to a length bucket and run
  `option_chunk` at a time against the cached prompts, so the cache copies
  stay bounded whatever the number of options.
  """

  def __init__(self, config: FlamingoConfig, *, batch_size: int = 8,
               prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
               option_buckets: Sequence[int] = (4, 8, 16, 32, 64), option_chunk: int = 32,
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
    """-> (log p [len(prompts), O, T] float32, lengths [O]) for options shared by all prompts.

    images: per prompt [N_i, T, H, W, 3] (N_i = its `<image>` count) or None;
    or visual_features: per prompt [N_i, T, S, C] frozen vision features.
    """
    c = self.config
    if not prompts:
      raise ValueError("Scorer: no prompts")
    if not options or any(len(opt) == 0 for opt in options):
      raise ValueError("Scorer: options must be a non-empty list of non-empty token lists")
    counts = count_image_tokens(prompts, c.image_token_id)
    as_features = visual_features is not None
    images = check_image_counts(prompts, counts, visual_features if as_features else images)
    lengths = np.array([len(opt) for opt in options])
    t = bucket(int(lengths.max()), self.option_buckets)
    num = len(options)
    padded = -(-num // self.option_chunk) * self.option_chunk
    table = np.full((padded, t), self.pad_token_id, np.int32)
    for i, opt in enumerate(list(options) + [options[0]] * (padded - num)):
      table[i, :len(opt)] = opt
    slots = max(counts)
    length = bucket(max(len(p) for p in prompts), self.prompt_buckets)
    out = np.zeros((len(prompts), num, t), np.float32)
    for start in range(0, len(prompts), self.batch_size):
      idx = list(range(start, min(start + self.batch_size, len(prompts))))
      real = len(idx)
      idx += [idx[0]] * (self.batch_size - real)
      tokens, mask = left_pad([prompts[i] for i in idx], length, self.pad_token_id)
      imgs = stack_images([images[i] for i in idx], slots) if slots else None
      encode, score = self._fns(t)
      visual = (None, imgs) if as_features else (imgs, None)
      next_logp, cache = self.placement.run(encode, params, tokens, mask, *visual)
      for o in range(0, padded, self.option_chunk):
        chunk = np.ascontiguousarray(np.broadcast_to(
            table[o:o + self.option_chunk], (self.batch_size, self.option_chunk, t)))
        lp = np.asarray(self.placement.fetch(
            self.placement.run(score, params, next_logp, cache, chunk)))
        keep = min(self.option_chunk, num - o)
        out[start:start + real, o:o + keep] = lp[:real, :keep]
    return out, lengths

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
