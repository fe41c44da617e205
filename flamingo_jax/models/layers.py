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


CAUSAL_BLOCK = 64


def blocked_causal_attention(q, k, v, mask, block: Optional[int] = None):
  """Causal self-attention by query blocks, each over the keys up to its own last slot.

  q [B, L, H, Dh], k/v [B, L, Hkv, Dh], mask [B, 1 or H, L, L] from
  `lm.self_attention_mask` (slot-causal, so keys after a block's last slot are
  masked for all its rows) -> [B, L, H, Dh]. Each block is the reference
  (`dot_product_attention`) on [block, stop] logits: the masked upper triangle
  is never computed, so the [B, H, L, L] float32 logits, which XLA's CPU
  backend writes and reads some 8 times per layer (no fused attention there),
  shrink to (1 + 1/n) / 2 of their size with n blocks. A row with a key to
  attend to equals the reference's (its masked logits add exact zeros there);
  a row with none (left padding) averages the values of its block's keys
  instead of all keys: padding rows, which no real token attends to.
  block: query rows per block (default CAUSAL_BLOCK).
  """
  length, block = q.shape[1], block or CAUSAL_BLOCK
  if mask is None or length <= block or k.shape[1] != length:
    return dot_product_attention(q, k, v, mask)
  mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], length, length))
  outs = []
  for start in range(0, length, block):
    stop = min(start + block, length)
    outs.append(dot_product_attention(q[:, start:stop], k[:, :stop], v[:, :stop],
                                      mask[:, :, start:stop, :stop]))
  return jnp.concatenate(outs, axis=1)


def resolve_attention(name: str, backend: Optional[str] = None) -> str:
  """model.attention -> the implementation to run on `backend` (default: JAX's).

  auto: cudnn on GPU, splash on TPU, xla elsewhere. cudnn / splash on another
  backend are a config error naming the key; blocked runs anywhere.
  """
  from flamingo_jax.errors import ConfigError  # noqa: PLC0415 (models import no CLI code)
  backend = backend or jax.default_backend()
  if name == "auto":
    return {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")
  need = {"cudnn": "gpu", "splash": "tpu"}.get(name)
  if need is not None and backend != need:
    raise ConfigError(f"config key 'model.attention' is {name!r}, which runs on {need.upper()} "
                      f"only, but the backend is {backend}: use 'xla' or 'auto'")
  if name not in ("xla", "cudnn", "splash", "blocked"):
    raise ConfigError(f"config key 'model.attention' is {name!r}; expected one of "
                      "['xla', 'cudnn', 'splash', 'blocked', 'auto']")
  return name


def attention(q, k, v, mask: Optional[jax.Array] = None, zero_rows: Optional[jax.Array] = None,
              *, implementation: str = "xla", causal_self: bool = False,
              sliding_window: int = 0):
  """`dot_product_attention` (the reference) by a resolved implementation.

  cudnn: jax.nn.dot_product_attention's cuDNN flash kernel, same mask.
  splash: the Pallas TPU kernel for a causal self-attention (causal_self, mask
  [B, 1, L, L] from `lm.self_attention_mask`; real tokens contiguous); blocked:
  `blocked_causal_attention` for a causal self-attention (any backend; XLA:CPU
  has no fused kernel). Any other attention (cross-attention's image-causal
  mask) runs the reference.
  """
  if implementation == "cudnn":
    return fused_attention(q, k, v, mask, zero_rows, implementation="cudnn")
  if implementation == "blocked" and causal_self:
    return blocked_causal_attention(q, k, v, mask)
  if implementation == "splash" and causal_self:
    valid = jnp.diagonal(jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))[:, 0],
                         axis1=-2, axis2=-1)  # a token attends to itself iff it is real
    return splash_self_attention(q, k, v, valid, sliding_window)
  return dot_product_attention(q, k, v, mask, zero_rows)


def fused_attention(q, k, v, mask: Optional[jax.Array] = None,
                    zero_rows: Optional[jax.Array] = None, implementation=None):
  """`dot_product_attention` through jax.nn.dot_product_attention (implementation
  None | 'xla' | 'cudnn'); same shapes and masks. A row that attends to nothing
  gets the reference's uniform average (its logits all at the fill value)."""
  b, lq, h, _ = q.shape
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, h, lq, k.shape[1]))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  if zero_rows is not None:
    zero_rows = jnp.broadcast_to(zero_rows, (b, 1, lq, 1)).reshape(b, lq, 1, 1)
    out = jnp.where(zero_rows, jnp.zeros((), out.dtype), out)
  return out


SPLASH_BLOCK = 128


def splash_self_attention(q, k, v, valid, sliding_window: int = 0, interpret: bool = False):
  """Causal self-attention with the Pallas splash kernel (TPU; interpret=True: any backend).

  q [B, L, H, Dh], k/v [B, L, Hkv, Dh], valid [B, L] bool (real tokens) ->
  [B, L, H, Dh]. Padding is a segment of its own (segment ids), the sliding
  window a LocalMask over slots: equal to `lm.self_attention_mask` for real
  query rows when the real tokens are contiguous (left or right padding).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
  b, length, h, dh = q.shape
  group = h // k.shape[2]
  pad = -length % SPLASH_BLOCK
  padded = length + pad

  def heads_major(a):  # [B, L, H, Dh] -> [B, H, L', Dh]
    return jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  q = heads_major(q * jnp.asarray(dh ** -0.5, q.dtype))
  k = heads_major(jnp.repeat(k, group, axis=2))
  v = heads_major(jnp.repeat(v, group, axis=2))
  one = (mask_lib.LocalMask((padded, padded), (sliding_window - 1, 0), offset=0)
         if sliding_window else mask_lib.CausalMask((padded, padded)))
  blocks = kernel_lib.BlockSizes(**{f: min(SPLASH_BLOCK, padded) for f in (
      "block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
      "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")})
  kernel = kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([one] * h), head_shards=1,
                                      q_seq_shards=1, block_sizes=blocks, interpret=interpret)
  seg = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=2)
  out = jax.vmap(kernel)(q, k, v, segment_ids=kernel_lib.SegmentIds(q=seg, kv=seg))
  return out.transpose(0, 2, 1, 3)[:, :length]


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

