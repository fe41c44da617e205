"""GATED XATTN-DENSE: the trainable block inserted before frozen LM blocks.

    y = y + tanh(alpha_xattn) * CrossAttention(q=LN(y), kv=LN(visual_tokens))
    y = y + tanh(alpha_dense) * FFW(LN(y))

The gates start at 0 (`gate_init`), so at initialisation the Flamingo model
computes exactly the frozen LM. LN is a LayerNorm or an RMSNorm (`norm`;
IDEFICS: RMSNorm, per-head RMSNorm of queries and keys with `qk_norm`, and its
LM's SwiGLU MLP as FFW; mllama: also grouped K/V heads, `num_kv_heads`).
Which visual tokens a text token may see comes from `models.masking`
(image-causal mask); what a token with no image gets is
`XAttnConfig.no_image` (see config.py for the four conventions).

Decoding computes the keys and values of the visual tokens once per prompt
(`x=None` returns them) and passes them back as `visual=(keys, values)` at
every step, instead of recomputing them from the visual tokens.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flamingo_jax.models.config import XAttnConfig
from flamingo_jax.models import layers


def _norm(c: XAttnConfig, name: str, axis_name: str = "embed", **kw):
  return layers.LayerNorm(name=name, axis_name=axis_name, eps=c.layernorm_eps,
                          rms=c.norm == "rmsnorm", **kw)


class CrossAttention(nn.Module):
  """Text queries attend to visual tokens under the image-causal mask."""
  config: XAttnConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention: str = "xla"  # a resolved implementation (layers.resolve_attention)

  @nn.compact
  def __call__(self, x, visual, mask, has_image):
    """x [B, L, D], visual [B, V, Dv], mask [B, L, V] bool, has_image [B, L] bool -> [B, L, D].

    visual may instead be precomputed (keys, values), each [B, V, H, Dh];
    with x=None the call returns those (keys, values) of `visual`.
    """
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = dict(head_dim=c.head_dim, use_bias=c.use_bias, **kw)
    kv_proj = dict(proj, num_heads=c.num_kv_heads or c.num_heads, in_axis="visual_embed")
    proj["num_heads"] = c.num_heads
    if isinstance(visual, tuple):
      k, v = visual
    else:
      if c.kv_layernorm:
        visual = _norm(c, "norm_kv", "visual_embed", **kw)(visual)
      k = layers.HeadProjection(name="key", **kv_proj)(visual)
      v = layers.HeadProjection(name="value", **kv_proj)(visual)
      if c.qk_norm:  # before caching: decoding reuses the normalised keys
        k = _norm(c, "key_norm", "kv", **kw)(k)
    if x is None:
      return k, v
    if c.query_layernorm:
      x = _norm(c, "norm_query", **kw)(x)
    q = layers.HeadProjection(name="query", **proj)(x)
    if c.qk_norm:
      q = _norm(c, "query_norm", "kv", **kw)(q)
    zero_rows = None
    if c.no_image == "zero_attention":
      zero_rows = ~has_image[:, None, :, None]
    if c.no_image == "attend_all":  # transformers' mllama: the row's mask is lifted
      mask = mask | ~has_image[..., None]
    out = layers.attention(q, k, v, mask[:, None], zero_rows=zero_rows,
                           implementation=self.attention)
    out = layers.OutProjection(x.shape[-1], use_bias=c.use_bias, name="out", **kw)(out)
    if c.no_image == "zero_output":
      out = jnp.where(has_image[..., None], out, 0)
    return out


class GatedCrossAttentionBlock(nn.Module):
  """One GATED XATTN-DENSE block (or its ablations, by config)."""
  config: XAttnConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention: str = "xla"

  def gate(self, name: str, width: int):
    """tanh(alpha), alpha a scalar (or per-channel vector) initialised by `gate_init`."""
    c = self.config
    if c.gating == "none":
      return jnp.ones((), self.dtype)
    shape, axes = ((1,), (None,)) if c.gate_shape == "scalar" else ((width,), ("embed",))
    init = {"zeros": nn.initializers.zeros, "ones": nn.initializers.ones,
            "normal": nn.initializers.normal(c.gate_init_std)}[c.gate_init]
    alpha = layers.param_with_axes(self, name, init, shape, jnp.float32, axes)
    return jnp.tanh(alpha).astype(self.dtype)

  @nn.compact
  def __call__(self, x, visual, mask, has_image):
    """x [B, L, D], visual [B, V, Dv], mask [B, L, V], has_image [B, L] -> [B, L, D].

    As in `CrossAttention`: visual may be precomputed (keys, values), and
    x=None returns the (keys, values) of `visual` (decoding computes them once).
    """
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = CrossAttention(c, name="attn", attention=self.attention, **kw)
    if x is None:
      return attn(None, visual, None, None)
    width = x.shape[-1]
    y = x + self.gate("attn_gate", width) * attn(x, visual, mask, has_image)
    if c.kind == "gated_dense":
      h = y
      if c.ffw_layernorm:
        h = _norm(c, "norm_ffw", **kw)(h)
      h = layers.FeedForward(c.ffw_dim or c.ffw_mult * width, c.activation, c.use_bias,
                             name="ffw", **kw)(h)
      if c.no_image == "attend_all":  # the row mask on the FFW output only
        h = jnp.where(has_image[..., None], h, jnp.zeros((), h.dtype))
      y = y + self.gate("ffw_gate", width) * h
    if c.no_image == "skip":
      y = jnp.where(has_image[..., None], y, x)
    return y.astype(x.dtype)


def tanh_gates(params, xattn_indices=None) -> dict[str, jax.Array]:
  """|tanh(alpha)| per block and gate (paper Fig. 6), e.g. {'xattn_block_0/attn_gate': 0.1}.

  `params` is the Flamingo param tree (boxed or not), in either layout; vector
  gates are averaged. The scanned layout (`xattn_blocks`, leaves [X, ...]) is
  named by LM block with xattn_indices, else by position in the stack.
  """
  out = {}
  unbox = lambda v: getattr(v, "value", v)  # noqa: E731 (logical partitioning)
  if "xattn_blocks" in params:
    stack = params["xattn_blocks"]
    for gate in ("attn_gate", "ffw_gate"):
      if gate in stack:
        values = unbox(stack[gate])
        names = xattn_indices if xattn_indices is not None else range(values.shape[0])
        for k, i in enumerate(names):
          out[f"xattn_block_{i}/{gate}"] = jnp.mean(jnp.abs(jnp.tanh(values[k])))
    return dict(sorted(out.items(), key=lambda kv: (int(kv[0].split("/")[0].rsplit("_", 1)[1]),
                                                    kv[0])))
  blocks = [k for k in params if k.startswith("xattn_block_")]
  for block in sorted(blocks, key=lambda k: int(k.rsplit("_", 1)[-1])):
    for gate in ("attn_gate", "ffw_gate"):
      if gate in params[block]:
        out[f"{block}/{gate}"] = jnp.mean(jnp.abs(jnp.tanh(unbox(params[block][gate]))))
  return out
