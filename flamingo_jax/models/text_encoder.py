"""BERT-style text encoder: the text tower of Flamingo's contrastive pretraining.

A bidirectional Transformer with learned absolute positions, LayerNorm and a
key-padding mask (paper appendix B.1.3 names only "BERT"; sizes are config).
tokens [B, L] int, mask [B, L] bool -> hidden [B, L, D]; padded positions
are never attended to, and the dual encoder mean-pools over real tokens only.

`norm` chooses where the LayerNorms sit:
  post  BERT: LayerNorm after the embeddings and after every residual add
  pre   LayerNorm before attention and FFW, one after the last block (as
        CLIP's text tower; steadier than post-LN at a high learning rate
        without warm-up, the paper's 1e-3 setting)
Parameter tree (under the encoder's name): token_embedding [V, D]
('vocab', 'embed'), position_embedding [max_length, D] (None, 'embed'),
block_{i}/{attn_norm, attn/{query,key,value,out}, ffw_norm, ffw/{up,down}},
and final_norm (pre) or embedding_norm (post).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.models.config import ACTIVATIONS
from flamingo_jax.models import layers

NORMS = ("pre", "post")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """Defaults: BERT-base (12 x 768, 12 heads of 64, FFW 3072) over Chinchilla's
  32,000-piece vocabulary plus `<image>`/`<EOC>`, captions of up to 64 tokens."""
  vocab_size: int = 32002
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  head_dim: int = 64
  ffw_mult: int = 4
  activation: str = "gelu"
  max_length: int = 64  # learned positions; longer inputs are an error
  norm: str = "pre"  # pre | post (BERT); see the module docstring
  layernorm_eps: float = 1e-12  # BERT's
  use_bias: bool = True  # BERT has biases in every projection
  remat: bool = False  # recompute each block in the backward pass


def validate_text_config(c: TextEncoderConfig, prefix: str = "model.text") -> None:
  """Raises ValueError naming the offending key."""
  for key in ("vocab_size", "width", "num_layers", "num_heads", "head_dim", "ffw_mult",
              "max_length"):
    v = getattr(c, key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"config key '{prefix}.{key}' must be a positive int, got {v!r}")
  if c.activation not in ACTIVATIONS:
    raise ValueError(f"config key '{prefix}.activation' is {c.activation!r}; expected one of "
                     f"{list(ACTIVATIONS)}")
  if c.norm not in NORMS:
    raise ValueError(f"config key '{prefix}.norm' is {c.norm!r}; expected one of {list(NORMS)}")
  if not c.layernorm_eps > 0:
    raise ValueError(f"config key '{prefix}.layernorm_eps' must be positive, got "
                     f"{c.layernorm_eps}")


class TextAttention(nn.Module):
  """Bidirectional self-attention: x [B, L, D], mask [B, L] bool -> [B, L, D].

  Padded keys get no weight; a padded query still gets an output (ignored by
  the masked pooling), so no row of the softmax is ever empty of keys unless
  the whole text is padding.
  """
  config: TextEncoderConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = dict(head_dim=c.head_dim, use_bias=c.use_bias, **kw)
    q = layers.HeadProjection(c.num_heads, name="query", **proj)(x)
    k = layers.HeadProjection(c.num_heads, name="key", **proj)(x)
    v = layers.HeadProjection(c.num_heads, name="value", **proj)(x)
    out = layers.dot_product_attention(q, k, v, mask[:, None, None, :])
    return layers.OutProjection(c.width, use_bias=c.use_bias, name="out", **kw)(out)


class TextBlock(nn.Module):
  """x [B, L, D], mask [B, L] bool -> [B, L, D]: attention + FFW, pre- or post-LN."""
  config: TextEncoderConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = TextAttention(c, name="attn", **kw)
    ffw = layers.FeedForward(c.ffw_mult * c.width, c.activation, c.use_bias, name="ffw", **kw)
    attn_norm = layers.LayerNorm(eps=c.layernorm_eps, name="attn_norm", **kw)
    ffw_norm = layers.LayerNorm(eps=c.layernorm_eps, name="ffw_norm", **kw)
    if c.norm == "pre":
      y = x + attn(attn_norm(x), mask)
      y = y + ffw(ffw_norm(y))
    else:
      y = attn_norm(x + attn(x, mask))
      y = ffw_norm(y + ffw(y))
    return nn.with_logical_constraint(
        y.astype(self.dtype), ("activation_batch", "activation_length", "activation_embed"))


class TextEncoder(nn.Module):
  """tokens [B, L] int32, mask [B, L] bool (True = real token) -> hidden [B, L, D].

  L may be anything up to config.max_length (positions 0..L-1 are used).
  Token ids must lie in [0, vocab_size): under jit an out-of-range id is
  clamped by the gather, not caught.
  """
  config: TextEncoderConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, mask):
    c = self.config
    validate_text_config(c)
    layers.check_rank("tokens", tokens, 2, "[B, L]")
    if mask.shape != tokens.shape:
      raise ValueError(f"text mask has shape {tuple(mask.shape)} but tokens have "
                       f"{tuple(tokens.shape)}; both must be [B, L]")
    length = tokens.shape[1]
    if length > c.max_length:
      raise ValueError(f"text of {length} tokens exceeds model.text.max_length = "
                       f"{c.max_length} (learned positions)")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    embedding = self.param(
        "token_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (c.vocab_size, c.width), self.param_dtype)
    positions = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (c.max_length, c.width), self.param_dtype)
    x = jnp.take(embedding, tokens, axis=0) + positions[None, :length]
    x = x.astype(self.dtype)
    if c.norm == "post":
      x = layers.LayerNorm(eps=c.layernorm_eps, name="embedding_norm", **kw)(x)
    mask = mask.astype(bool)
    block = nn.remat(TextBlock) if c.remat else TextBlock
    for i in range(c.num_layers):
      x = block(c, name=f"block_{i}", **kw)(x, mask)
    if c.norm == "pre":
      x = layers.LayerNorm(eps=c.layernorm_eps, name="final_norm", **kw)(x)
    return x


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """x [B, L, D], mask [B, L] -> [B, D] float32: the mean over real tokens only.

  A row without any real token gives 0 (not 0/0).
  """
  if mask.shape != x.shape[:2]:
    raise ValueError(f"mask {tuple(mask.shape)} does not match the first two axes of "
                     f"{tuple(x.shape)}")
  m = mask.astype(bool)[..., None]
  total = jnp.sum(jnp.where(m, x.astype(jnp.float32), 0.0), axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1, dtype=jnp.float32), 1.0)
