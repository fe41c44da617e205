"""Decoder-only language model: the frozen LM that Flamingo conditions on images.

One module covers seven families by config (see `config.lm_preset`):
  chinchilla  pre-LayerNorm, GeLU FFW 4x, rotary positions, tied embeddings
              (the paper's frozen LM; Chinchilla itself used RMSNorm and
              relative positions: both are config options, see docs)
  llama       RMSNorm, SwiGLU, rotary positions, grouped KV heads, untied
  gpt2        learned positions, LayerNorm with biases, GeLU (tanh), tied
  gpt_neox    parallel residual, rotary on part of each head, biases, untied
              (Pythia, RedPajama-INCITE)
  mpt         ALiBi, LayerNorm and projections without biases, tied (MPT-7B;
              with qk_norm, MPT-1B's mosaic_gpt)
  qwen2       llama with biases on the query/key/value projections
  gemma       llama with GeGLU, tied embeddings scaled by sqrt(D) on input
Rotary frequencies may be scaled for long contexts (Llama 3.1, see
`models/rotary.py`) and attention limited to a sliding window (Mistral).

The Flamingo model drives the pieces separately (embed -> blocks with
cross-attention in between -> logits), so they are exposed as methods.
Self-attention takes the positions and mask explicitly, so the KV cache for
decoding (`cache=`) only replaces how keys and values are gathered: the new
tokens' keys and values are written into fixed-size buffers and the queries
attend over the whole buffer under the caller's mask. Every such mask (full
sequence or cache; causal, padding, sliding window) comes from
`self_attention_mask`, the one place that decides who attends to whom. ALiBi needs no
positions in the cache: a query's distance to a key is the number of keys it
may attend to after that key, which the mask already says.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.config import LMConfig
from flamingo_jax.models import layer_stack, layers, rotary


POSITIONS = ("rotary", "learned", "alibi", "none")


def _norm(c: LMConfig, name: str, dtype, param_dtype):
  return layers.LayerNorm(name=name, eps=c.norm_eps, rms=c.norm == "rmsnorm",
                          use_bias=c.norm_bias, dtype=dtype, param_dtype=param_dtype)


def alibi_slopes(num_heads: int, bias_max: float) -> np.ndarray:
  """[H] float32 ALiBi slopes, as MosaicML's (and transformers') build_mpt_alibi_tensor.

  With H' the next power of two, slope_i = 2^(-i * bias_max / H') for i = 1..H';
  when H < H' the odd-indexed slopes come first, then the even ones, cut to H.
  """
  n2 = 2 ** math.ceil(math.log2(num_heads))
  base = np.arange(1, n2 + 1, dtype=np.float32) * np.float32(bias_max / n2)
  slopes = (np.float32(1.0) / np.power(np.float32(2.0), base)).astype(np.float32)
  if n2 != num_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes


def alibi_attention(q, k, v, mask, slopes, scale: float):
  """Softmax attention with the ALiBi bias -slope_h * distance.

  q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh], mask [B, 1, Lq, Lk] (True = attend),
  slopes [H] -> [B, Lq, H, Dh]. The distance from a query to a key is the
  number of keys the query attends to after that key: for a causal mask over
  left-padded tokens or a cache with gaps, that is the distance in real tokens,
  and the query's own key is at distance 0. transformers' MPT adds
  slope * (key index - last index) instead, which differs per row by a
  constant, so the softmax is the same.
  """
  b, lq, h, dh = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if h % hkv:
    raise ValueError(f"query heads {h} are not a multiple of key/value heads {hkv}")
  group = h // hkv
  mask = jnp.broadcast_to(mask, (b, 1, lq, lk))
  m = mask.astype(jnp.int32)
  after = jnp.sum(m, -1, keepdims=True) - jnp.cumsum(m, -1)  # [B, 1, Lq, Lk]
  bias = -jnp.asarray(slopes, jnp.float32)[None, :, None, None] * after.astype(jnp.float32)
  q = q.reshape(b, lq, hkv, group, dh)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * scale + bias.reshape(b, hkv, group, lq, lk)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", weights.astype(v.dtype), v)
  return out.reshape(b, lq, h, dh)


def _head_norm(c: LMConfig, name: str, dtype, param_dtype):
  """A LayerNorm over all heads at once: x [B, L, H, Dh] normed over H * Dh."""
  norm = layers.LayerNorm(name=name, axis_name=None, eps=c.norm_eps, use_bias=c.norm_bias,
                          dtype=dtype, param_dtype=param_dtype)
  return lambda x: norm(layers.flatten_dims(x, 2, 4)).reshape(x.shape)


class SelfAttention(nn.Module):
  config: LMConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention: str = "xla"  # a resolved implementation (layers.resolve_attention)

  @nn.compact
  def __call__(self, x, positions, mask, cache=None):
    """x [B, L, D], positions [B, L], mask [B, 1, L, L] (True = attend) -> [B, L, D].

    cache (decoding): (keys, values, index) with keys/values [B, S, Hkv, Dh]
    and index an int32 scalar. The L new keys/values are written at slots
    index..index+L-1, the queries attend over all S slots with mask
    [B, 1, L, S], and the result is (out [B, L, D], (keys, values)).
    """
    c = self.config
    kw = dict(head_dim=c.head_dim, use_bias=c.use_bias or c.qkv_bias, dtype=self.dtype,
              param_dtype=self.param_dtype)
    kv_heads = c.num_kv_heads or c.num_heads
    q = layers.HeadProjection(c.num_heads, name="query", **kw)(x)
    k = layers.HeadProjection(kv_heads, name="key", **kw)(x)
    v = layers.HeadProjection(kv_heads, name="value", **kw)(x)
    if c.qk_norm:  # over all heads at once, as mosaic_gpt's q_ln / k_ln on [B, L, H * Dh]
      q = _head_norm(c, "query_norm", self.dtype, self.param_dtype)(q)
      k = _head_norm(c, "key_norm", self.dtype, self.param_dtype)(k)
    if c.positions == "rotary":
      inv_freq = rotary.config_frequencies(c)
      q = rotary.apply_rotary(q, positions, inv_freq)
      k = rotary.apply_rotary(k, positions, inv_freq)
    if cache is not None:
      keys, values, index = cache
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
      v = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
    scale = c.attention_scale or c.head_dim ** -0.5
    if c.positions == "alibi":
      out = alibi_attention(q, k, v, mask, alibi_slopes(c.num_heads, c.alibi_bias_max), scale)
    else:
      if c.attention_scale:  # dot_product_attention scales by head_dim ** -0.5
        q = q * jnp.asarray(scale * c.head_dim ** 0.5, q.dtype)
      # decoding keeps the einsum path: its mask covers a cache with gaps
      impl = self.attention if cache is None else "xla"
      out = layers.attention(q, k, v, mask, implementation=impl, causal_self=True,
                             sliding_window=c.sliding_window)
    out = layers.OutProjection(x.shape[-1], use_bias=c.use_bias, name="out",
                               dtype=self.dtype, param_dtype=self.param_dtype)(out)
    return out if cache is None else (out, (k, v))


class DecoderBlock(nn.Module):
  config: LMConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, positions, mask, cache=None):
    """x [B, L, D] -> [B, L, D]; with a `SelfAttention` cache -> (y, new cache)."""
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ffw = layers.FeedForward(c.ffw_dim or c.ffw_mult * c.width, c.activation, c.use_bias,
                             name="ffw", **kw)
    attn = SelfAttention(c, name="attn", attention=self.attention, **kw)(
        _norm(c, "attn_norm", **kw)(x), positions, mask, cache)
    if cache is not None:
      attn, cache = attn
    if c.parallel_residual:
      y = x + attn + ffw(_norm(c, "ffw_norm", **kw)(x))
    else:
      y = x + attn
      y = y + ffw(_norm(c, "ffw_norm", **kw)(y))
    y = nn.with_logical_constraint(
        y.astype(x.dtype), ("activation_batch", "activation_length", "activation_embed"))
    return y if cache is None else (y, cache)


def self_attention_mask(query_slots, key_valid, query_positions, key_positions,
                        sliding_window: int = 0):
  """The LM's self-attention mask, for a whole sequence and for the KV cache alike.

  query_slots [Lq] int: each query's index in the key axis (its own slot);
  key_valid [B, S] bool: real keys (padding and unwritten cache slots False);
  query_positions [B, Lq], key_positions [B, S] int: token positions, counting
  real tokens only. A query attends to a key when the key is valid, not after
  it (slot <= the query's slot), and, with sliding_window W > 0, fewer than W
  positions back (Mistral: itself and the W - 1 tokens before it). Returns
  [B, 1, Lq, S] bool (True = attend).
  """
  s = key_valid.shape[1]
  causal = jnp.arange(s)[None, :] <= query_slots[:, None]  # [Lq, S]
  mask = key_valid[:, None, None, :] & causal[None, None]
  if sliding_window:
    near = query_positions[:, :, None] - key_positions[:, None, :] < sliding_window
    mask = mask & near[:, None]
  return mask


def sequence_mask(attention_mask: Optional[jax.Array], positions, sliding_window: int = 0):
  """[B, 1, L, L] mask of a whole sequence: attention_mask [B, L] (1 = real token, None:
  all real), positions [B, L]."""
  b, length = positions.shape
  valid = (jnp.ones((b, length), bool) if attention_mask is None
           else attention_mask.astype(bool))
  return self_attention_mask(jnp.arange(length), valid, positions, positions, sliding_window)


def default_positions(attention_mask: Optional[jax.Array], batch: int, length: int):
  """[B, L] positions counting only real tokens (left padding safe); also the key
  positions of a KV cache, given its real slots [B, S]."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class DecoderLM(nn.Module):
  """tokens [B, L] -> logits [B, L, V].

  scan: the blocks' params stacked as `blocks` (leaves [num_layers, ...]) and
  run under a scan (see models/layer_stack.py), else one module `blocks_{i}`
  per block. attention: model.attention (xla | cudnn | splash | auto).
  """
  config: LMConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention: str = "xla"

  def setup(self):
    c = self.config
    if c.positions not in POSITIONS:
      raise ValueError(f"LMConfig.positions is {c.positions!r}; expected one of {POSITIONS}")
    if not 0 <= c.rotary_dim <= c.head_dim or c.rotary_dim % 2:
      raise ValueError(f"LMConfig.rotary_dim {c.rotary_dim} must be even and in "
                       f"[0, head_dim = {c.head_dim}]")
    if c.positions == "rotary":
      rotary.config_frequencies(c)  # rejects an unknown rope_scaling here, by name
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embed_init = nn.with_logical_partitioning(nn.initializers.normal(1.0 / c.width ** 0.5),
                                              ("vocab", "embed"))
    self.embedding = self.param("embedding", embed_init, (self.rows, c.width),
                                self.param_dtype)
    if c.positions == "learned":
      self.position_embedding = self.param(
          "position_embedding",
          nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
          (c.max_length, c.width), self.param_dtype)
    attention = layers.resolve_attention(self.attention)
    if self.scan:
      example = (jnp.zeros((1, 1, c.width), self.dtype), jnp.zeros((1, 1), jnp.int32),
                 jnp.ones((1, 1, 1, 1), bool))
      self.blocks = layer_stack.stacked_param(self, layer_stack.LM_STACK, self.template(),
                                              c.num_layers, example)
    else:
      block = layer_stack.remat_module(DecoderBlock, self.remat)
      self.blocks = [block(c, name=f"blocks_{i}", attention=attention, **kw)
                     for i in range(c.num_layers)]
    self.final_norm = _norm(c, "final_norm", **kw)
    if not c.tie_embeddings:
      self.unembed = layers.Dense(self.rows, ("embed", "vocab"), name="unembed", **kw)

  def template(self) -> DecoderBlock:
    """The unbound block the stacked params are applied with (scan only)."""
    return DecoderBlock(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                        attention=layers.resolve_attention(self.attention), parent=None)

  @property
  def rows(self) -> int:
    """Rows of the embedding matrices: vocab_size, or fewer when a Flamingo grew the
    vocabulary (`LMConfig.embedding_rows`)."""
    return self.config.embedding_rows or self.config.vocab_size

  def embed(self, tokens, positions, new_rows=()):
    """tokens [B, L] int, positions [B, L] -> [B, L, D].

    new_rows: (token id, row [D]) pairs that replace the embedding matrix's
    rows of those ids (Flamingo's trainable `<image>` / `<EOC>`). Only the
    token embedding is replaced: the row is scaled and gets its position
    embedding like any other, so it equals writing the row into the matrix.
    """
    c = self.config
    # ids past the LM's rows (grown vocabulary) must come with a new row
    x = jnp.take(self.embedding, jnp.minimum(tokens, self.rows - 1), axis=0).astype(self.dtype)
    for token_id, row in new_rows:
      x = jnp.where((tokens == token_id)[..., None], row.astype(x.dtype), x)
    if c.embedding_scale != 1.0:
      x = x * jnp.asarray(c.embedding_scale, self.dtype)
    if c.positions == "learned":
      x = x + jnp.take(self.position_embedding, positions, axis=0).astype(self.dtype)
    return x

  def block(self, i: int, x, positions, mask, cache=None):
    """Block i; with a cache (see `SelfAttention`) -> (x, new cache)."""
    args = (x, positions, mask) if cache is None else (x, positions, mask, cache)
    if self.scan:
      return layer_stack.apply_block(self.template(), layer_stack.take(self.blocks, i), *args)
    return self.blocks[i](*args)

  def stacked_blocks(self):
    """The stacked block params, leaves [num_layers, ...] (scan only)."""
    return self.blocks

  def block_fn(self, positions, mask):
    """(x [B, L, D], params of one stacked block) -> x, with `remat` applied (scan only)."""
    run = lambda h, p: layer_stack.apply_block(self.template(), p, h, positions, mask)  # noqa: E731
    return layer_stack.remat_policy(self.remat)(run)

  def run_blocks(self, start: int, stop: int, x, positions, mask):
    """Blocks [start, stop) on x [B, L, D] (one scan with the scanned layout)."""
    if not self.scan:
      for i in range(start, stop):
        x = self.block(i, x, positions, mask)
      return x
    return layer_stack.scan(self.block_fn(positions, mask), x,
                            layer_stack.take_range(self.blocks, start, stop))

  def hidden_to_logits(self, h):
    """h [B, L, D] (before the final norm) -> (normed h [B, L, D], logits [B, L, V] f32).

    Ids without an LM row (a grown vocabulary) get the lowest float32 logit: the
    LM cannot emit them; Flamingo writes its new rows' logits there.
    """
    h = self.final_norm(h)
    if self.config.tie_embeddings:
      logits = jnp.einsum("bld,vd->blv", h, self.embedding.astype(self.dtype))
    else:
      logits = self.unembed(h)
    logits = logits.astype(jnp.float32)
    missing = self.config.vocab_size - self.rows
    if missing:
      logits = jnp.pad(logits, ((0, 0), (0, 0), (0, missing)),
                       constant_values=jnp.finfo(jnp.float32).min)
    return h, logits

  def __call__(self, tokens, attention_mask=None, positions=None):
    """tokens [B, L] int, attention_mask [B, L] (1 = real token) -> logits [B, L, V].

    positions [B, L] feed learned and rotary positions and the sliding window;
    ALiBi derives its distances from the mask (see `alibi_attention`).
    """
    b, length = tokens.shape
    if positions is None:
      positions = default_positions(attention_mask, b, length)
    mask = sequence_mask(attention_mask, positions, self.config.sliding_window)
    x = self.embed(tokens, positions)
    x = self.run_blocks(0, self.config.num_layers, x, positions, mask)
    return self.hidden_to_logits(x)[1]
