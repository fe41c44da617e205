"""Small building blocks shared by the resampler, the cross-attention and the LM.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so
the training system can map them onto a device mesh by rule. Logical names:
  embed      model width of the module that owns the parameter
  mlp        feed-forward hidden width
  heads      attention heads (query heads, or kv heads for K/V projections)
  kv         per-head width
  vocab      vocabulary
  latents    resampler latents
  visual_embed  width of visual features entering a cross-attention or resampler
  frames     temporal embeddings / media embeddings
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype

default_kernel_init = nn.initializers.lecun_normal()


def param_with_axes(module: nn.Module, name: str, init_fn, shape, dtype, axes):
  return module.param(name, nn.with_logical_partitioning(init_fn, axes), shape, dtype)


def matmul_2d(x, kernel, in_dims: int = 1):
  """x [..., K1..Kn] @ kernel [K1..Kn, N1..Nm] -> [..., N1..Nm], as one 2-D matmul.

  The trailing `in_dims` axes of x contract with the leading `in_dims` axes of
  kernel. Leading axes of x are flattened into one row axis first (a free
  reshape), so the backward pass's weight gradient is a plain 2-D
  [rows, K]^T @ [rows, N] matmul that XLA hands to its matmul library as is.
  With [B, L, ...] kept as separate axes (an einsum over "..."), XLA lowers
  that gradient with an explicit 3-D transposed copy of the activation
  gradient (fused with the elementwise backward before it), which its CPU
  backend emits as a strided, cache-missing loop: on configs/bench.py those
  copies were ~20% of the float32 train step (28 -> 19 CPU-s/step with this).
  Same maths, bit-identical gradients.
  """
  lead, contract = x.shape[:x.ndim - in_dims], x.shape[x.ndim - in_dims:]
  out = kernel.shape[in_dims:]
  k = math.prod(contract)
  y = jnp.dot(x.reshape(-1, k), kernel.reshape(k, math.prod(out)))
  return y.reshape(lead + out)


def activation(name: str):
  """Pointwise activation by config name."""
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "quick_gelu":  # OpenAI CLIP
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "relu":
    return jax.nn.relu
  if name == "squared_relu":
    return lambda x: jnp.square(jax.nn.relu(x))
  if name == "silu":
    return jax.nn.silu
  raise ValueError(f"unknown activation {name!r}")


class Dense(nn.Module):
  """y = x @ W (+ b) over the last axis, with logical axes on W."""
  features: int
  axes: tuple[str, str] = ("embed", "mlp")
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x):
    kernel = param_with_axes(self, "kernel", self.kernel_init,
                             (x.shape[-1], self.features), self.param_dtype, self.axes)
    y = matmul_2d(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                             self.param_dtype, (self.axes[1],))
      y = y + bias.astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm (or RMSNorm with `rms=True`), statistics in float32."""
  axis_name: str = "embed"
  eps: float = 1e-5
  use_bias: bool = True
  rms: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    xf = x.astype(jnp.float32)
    if self.rms:
      y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
    else:
      mean = jnp.mean(xf, -1, keepdims=True)
      var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
      y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), self.param_dtype,
                            (self.axis_name,))
    y = y * scale.astype(jnp.float32)
    if self.use_bias and not self.rms:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), self.param_dtype,
                             (self.axis_name,))
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class FeedForward(nn.Module):
  """Pre-norm-free FFW: Dense(hidden) -> activation -> Dense(width).

  `activation` is a pointwise name, or swiglu/geglu for the gated form
  act(x W_gate) * (x W_up) used by Llama.
  """
  hidden: int
  activation: str = "gelu"
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.activation in ("swiglu", "geglu"):
      act = jax.nn.silu if self.activation == "swiglu" else activation("gelu_tanh")
      gate = Dense(self.hidden, ("embed", "mlp"), name="gate", **kw)(x)
      up = Dense(self.hidden, ("embed", "mlp"), name="up", **kw)(x)
      h = act(gate) * up
    else:
      h = activation(self.activation)(Dense(self.hidden, ("embed", "mlp"), name="up", **kw)(x))
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    return Dense(d, ("mlp", "embed"), name="down", **kw)(h)


class HeadProjection(nn.Module):
  """x [..., D] -> [..., H, Dh] (queries, keys or values)."""
  num_heads: int
  head_dim: int
  in_axis: str = "embed"
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = param_with_axes(self, "kernel", default_kernel_init,
                             (x.shape[-1], self.num_heads, self.head_dim), self.param_dtype,
                             (self.in_axis, "heads", "kv"))
    y = matmul_2d(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros,
                             (self.num_heads, self.head_dim), self.param_dtype, ("heads", "kv"))
      y = y + bias.astype(self.dtype)
    return y


class OutProjection(nn.Module):
  """[..., H, Dh] -> [..., D]."""
  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = param_with_axes(self, "kernel", default_kernel_init,
                             (x.shape[-2], x.shape[-1], self.features), self.param_dtype,
                             ("heads", "kv", "embed"))
    y = matmul_2d(x.astype(self.dtype), kernel.astype(self.dtype), in_dims=2)
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,),
                             self.param_dtype, ("embed",))
      y = y + bias.astype(self.dtype)
    return y


def dot_product_attention(q, k, v, mask: Optional[jax.Array] = None,
                          zero_rows: Optional[jax.Array] = None):
  """Softmax attention with grouped KV heads.

  q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh] with H a multiple of Hkv,
  mask broadcastable to [B, H, Lq, Lk] (True = may attend),
  zero_rows broadcastable to [B, 1, Lq, 1]: rows whose weights are zeroed
  (a query with nothing to attend to gets 0 instead of a uniform average).
  Returns [B, Lq, H, Dh]. Logits and softmax are computed in float32.
  """
  b, lq, h, dh = q.shape
  hkv = k.shape[2]
  if h % hkv:
    raise ValueError(f"query heads {h} are not a multiple of key/value heads {hkv}")
  group = h // hkv
  q = q.reshape(b, lq, hkv, group, dh)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * (dh ** -0.5)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, h, lq, k.shape[1])).reshape(b, hkv, group, lq, -1)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if zero_rows is not None:
    zero_rows = jnp.broadcast_to(zero_rows, (b, 1, lq, 1)).reshape(b, 1, 1, lq, 1)
    weights = jnp.where(zero_rows, 0.0, weights)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", weights.astype(v.dtype), v)
  return out.reshape(b, lq, h, dh)


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def flatten_dims(x, start: int, end: int):
  """Merges axes [start, end) of x."""
  shape = x.shape
  return x.reshape(shape[:start] + (-1,) + shape[end:])


def patchify(images, patch_size: int):
  """images [B, H, W, C] -> non-overlapping patches [B, H/p, W/p, p*p*C] (row-major p, p, C)."""
  check_rank("images", images, 4, "[B, H, W, 3]")
  b, h, w, ch = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
  x = images.reshape(b, h // p, p, w // p, p, ch)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * ch)


def check_rank(name: str, x, rank: int, layout: str):
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")

