"""Perceiver Resampler: a variable number of visual features -> a fixed number of tokens.

Per image (or video clip) the input is a feature grid [T, S, d] (T frames,
S spatial positions). A learned temporal embedding [T, 1, d] is added (linearly
interpolated when a clip has more frames than were trained), the grid is
flattened to [T*S, d], and `depth` layers update `num_latents` learned latents:

    latents += Attention(q=LN(latents), kv=concat(LN(features), LN(latents)))
    latents += FFW(LN(latents))

(`qk_layernorm`: queries and keys are also LayerNormed per head, as IDEFICS does.)

The output is LN(latents): [num_latents, width] per image, whatever T and S.
The ablations of paper Table 3 (resampler -> MLP, -> Transformer) are
`ResamplerConfig.kind` = "mlp" / "transformer"; "linear" is no resampler at
all, a projection of every feature (mllama's multi_modal_projector: an image's
T tiles of S tokens give T * S visual tokens).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.models.config import ResamplerConfig
from flamingo_jax.models import layers


def interpolate_temporal(emb: jax.Array, num_frames: int) -> jax.Array:
  """[T_train, 1, d] -> [num_frames, 1, d].

  Truncates when num_frames <= T_train (a shorter clip uses the first
  embeddings, as in training), otherwise interpolates linearly between the
  trained embeddings (the paper's 8 -> 30 frames at inference).
  """
  t_train = emb.shape[0]
  if num_frames <= t_train:
    return emb[:num_frames]
  pos = jnp.linspace(0.0, t_train - 1.0, num_frames)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, t_train - 1)
  w = (pos - lo)[:, None, None].astype(emb.dtype)
  return emb[lo] * (1 - w) + emb[hi] * w


class ResamplerAttention(nn.Module):
  """Latents attend to concat(features, latents)."""
  config: ResamplerConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features, latents):
    """features [B, M, d] or None, latents [B, n, d] -> update [B, n, d].

    With features=None this is plain self-attention over `latents` (the
    "transformer" ablation).
    """
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = dict(eps=c.layernorm_eps, **kw)
    latents = layers.LayerNorm(name="norm_latents", **ln)(latents)
    kv_in = latents
    if features is not None:
      features = layers.LayerNorm(name="norm_media", **ln)(features)
      kv_in = jnp.concatenate([features, latents], axis=1)
    proj = dict(num_heads=c.num_heads, head_dim=c.head_dim, use_bias=c.use_bias, **kw)
    q = layers.HeadProjection(name="query", **proj)(latents)
    k = layers.HeadProjection(name="key", **proj)(kv_in)
    v = layers.HeadProjection(name="value", **proj)(kv_in)
    if c.qk_layernorm:  # IDEFICS: per head, over head_dim, before the 1/sqrt(Dh) scaling
      q = layers.LayerNorm(name="query_norm", axis_name="kv", **ln)(q)
      k = layers.LayerNorm(name="key_norm", axis_name="kv", **ln)(k)
    out = layers.dot_product_attention(q, k, v)
    return layers.OutProjection(latents.shape[-1], use_bias=c.use_bias, name="out", **kw)(out)


class ResamplerFFW(nn.Module):
  config: ResamplerConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.LayerNorm(name="norm", eps=c.layernorm_eps, **kw)(x)
    return layers.FeedForward(c.ffw_mult * x.shape[-1], c.activation, c.use_bias, name="ffw",
                              **kw)(x)


class PerceiverResampler(nn.Module):
  """Visual features [B, N, T, S, d] -> visual tokens [B, N, num_latents, width]."""
  config: ResamplerConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    c = self.config
    layers.check_rank("visual features", features, 5, "[B, N, T, S, d]")
    b, n_img, t, s, d = features.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = features.astype(self.dtype)
    if c.kind == "linear":  # [B, N, T, S, d] -> [B, N, T * S, width]
      out = layers.Dense(c.width, ("visual_embed", "embed"), use_bias=c.use_bias,
                         name="projection", **kw)(x).reshape(b, n_img, t * s, c.width)
      return nn.with_logical_constraint(
          out, ("activation_batch", None, "activation_visual_length", "activation_embed"))
    if c.temporal_embeddings:
      temporal = layers.param_with_axes(
          self, "temporal_embeddings", nn.initializers.normal(0.02), (c.max_frames, 1, d),
          self.param_dtype, ("frames", None, "visual_embed"))
      x = x + interpolate_temporal(temporal, t).astype(self.dtype)[None, None]
    if c.input_proj:
      x = layers.Dense(c.width, ("visual_embed", "embed"), use_bias=c.use_bias,
                       name="input_proj", **kw)(x)
    elif d != c.width:
      raise ValueError(
          f"visual features are {d} wide but the resampler is {c.width} wide and "
          "model.resampler.input_proj is False")
    x = x.reshape(b, n_img, t * s, c.width)
    if c.num_media_embeddings:
      if n_img > c.num_media_embeddings:
        raise ValueError(f"{n_img} images per example exceed "
                         f"model.resampler.num_media_embeddings={c.num_media_embeddings}")
      media = layers.param_with_axes(
          self, "media_embeddings", nn.initializers.normal(0.02),
          (c.num_media_embeddings, 1, c.width), self.param_dtype, ("frames", None, "embed"))
      x = x + media[:n_img].astype(self.dtype)[None]
    x = x.reshape(b * n_img, t * s, c.width)

    if c.kind == "mlp":
      # Table 3 "MLP": no latents; an MLP per position, then pooled to
      # num_latents tokens by averaging contiguous groups of positions.
      out = x
      for i in range(c.depth):
        out = out + ResamplerFFW(c, name=f"layers_{i}_ffw", **kw)(out)
      out = _pool_to(out, c.num_latents)
    else:
      latents = layers.param_with_axes(
          self, "latents", nn.initializers.normal(1.0), (c.num_latents, c.width),
          self.param_dtype, ("latents", "embed"))
      latents = jnp.broadcast_to(latents.astype(self.dtype), (b * n_img,) + latents.shape)
      if c.kind == "transformer":
        # Table 3 "Transformer": self-attention over [features; latents] with
        # the latents' outputs kept (features are updated too).
        seq = jnp.concatenate([x, latents], axis=1)
        for i in range(c.depth):
          seq = seq + ResamplerAttention(c, name=f"layers_{i}_attn", **kw)(None, seq)
          seq = seq + ResamplerFFW(c, name=f"layers_{i}_ffw", **kw)(seq)
        out = seq[:, -c.num_latents:]
      else:
        for i in range(c.depth):
          latents = latents + ResamplerAttention(c, name=f"layers_{i}_attn", **kw)(x, latents)
          latents = latents + ResamplerFFW(c, name=f"layers_{i}_ffw", **kw)(latents)
        out = latents
    out = layers.LayerNorm(name="norm", eps=c.layernorm_eps, **kw)(out)
    out = out.reshape(b, n_img, c.num_latents, c.width)
    return nn.with_logical_constraint(
        out, ("activation_batch", None, "activation_visual_length", "activation_embed"))


def _pool_to(x, n):
  """[B, M, D] -> [B, n, D] by averaging n contiguous groups (M padded by edge)."""
  b, m, d = x.shape
  per = -(-m // n)
  pad = per * n - m
  if pad:
    x = jnp.concatenate([x, jnp.repeat(x[:, -1:], pad, axis=1)], axis=1)
  return x.reshape(b, n, per, d).mean(axis=2)
