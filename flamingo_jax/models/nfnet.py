"""NFNet-F0..F7 (Brock et al. 2021), the vision encoder of Flamingo.

Normalizer-free ResNet: scaled weight standardisation instead of batch norm,
variance-preserving (gamma-scaled) activations, pre-activation bottleneck
blocks with squeeze-excite, and residual branches scaled by alpha and a
SkipInit gain. Faithful to DeepMind's released Haiku code (deepmind-research
/nfnets) and to timm's `dm_nfnet_f*`; where they differ the config chooses
(docs/nfnet.md):
  activation  "gelu" exact erf (timm) | "gelu_tanh" (DeepMind's jax.nn.gelu)
  ws_style    "deepmind" | "timm" (where eps enters the standardisation)

Images are NHWC. Parameter tree (under 'params'):
  stem_conv{0..3}/{kernel, gain, bias}
  block_{i}/{conv0, conv1, conv1b, conv2, conv_shortcut}/{kernel, gain, bias}
  block_{i}/se/fc{0,1}/{kernel, bias}, block_{i}/skip_gain
  final_conv/{kernel, gain, bias}, classifier/{kernel, bias}
with blocks numbered across stages as in DeepMind's code. Every parameter
carries logical axis names: conv kernels ('conv_height', 'conv_width',
'conv_in', 'conv_out'), per-channel gain/bias ('conv_out',), squeeze-excite
kernels ('conv_in', 'conv_out'), the classifier ('embed', 'vocab').
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.config import NFNetConfig
from flamingo_jax.models.vision_registry import register_vision_encoder

Dtype = Any

# Blocks per stage, train / test resolution and classifier dropout of each
# variant (DeepMind nfnets/base.py, NFNet paper Table 1).
VARIANTS = {
    "F0": dict(depths=(1, 2, 6, 3), train_size=192, test_size=256, dropout_rate=0.2),
    "F1": dict(depths=(2, 4, 12, 6), train_size=224, test_size=320, dropout_rate=0.3),
    "F2": dict(depths=(3, 6, 18, 9), train_size=256, test_size=352, dropout_rate=0.4),
    "F3": dict(depths=(4, 8, 24, 12), train_size=320, test_size=416, dropout_rate=0.4),
    "F4": dict(depths=(5, 10, 30, 15), train_size=384, test_size=512, dropout_rate=0.5),
    "F5": dict(depths=(6, 12, 36, 18), train_size=416, test_size=544, dropout_rate=0.5),
    "F6": dict(depths=(7, 14, 42, 21), train_size=448, test_size=576, dropout_rate=0.5),
    "F7": dict(depths=(8, 16, 48, 24), train_size=480, test_size=608, dropout_rate=0.5),
}

STAGE_STRIDES = (1, 2, 2, 2)
STEM_STRIDES = (2, 1, 1, 2)

# gamma such that gamma * act(x) has unit variance for x ~ N(0, 1)
# (DeepMind nfnets/base.py; timm uses the same constants).
ACTIVATION_GAMMA = {
    "gelu": 1.7015043497085571,
    "gelu_tanh": 1.7015043497085571,
    "relu": 1.7139588594436646,
    "silu": 1.7881293296813965,
}
SE_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
WS_STYLES = {"deepmind": 1e-4, "timm": 1e-5}  # style -> default eps

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


# --------------------------------------------------------------------------
# Config


def variant_depths(config: NFNetConfig) -> tuple[int, ...]:
  """Blocks per stage: `depths` when set, else the variant's."""
  if config.depths is not None:
    return tuple(config.depths)
  return VARIANTS[config.variant]["depths"]


def variant_dropout_rate(config: NFNetConfig) -> float:
  if config.dropout_rate is not None:
    return config.dropout_rate
  return VARIANTS[config.variant]["dropout_rate"]


def nfnet_feature_dim(config: NFNetConfig) -> int:
  """Channels C of the feature grid: 3072 for F-models, 1536 without final conv."""
  if config.final_conv:
    return int(config.final_conv_mult * config.widths[-1])
  return config.widths[-1]


def ws_eps(config: NFNetConfig) -> float:
  return WS_STYLES[config.ws_style] if config.ws_eps is None else config.ws_eps


def validate_nfnet_config(c: NFNetConfig, prefix: str = "model.vision.nfnet") -> None:
  """Raises ValueError naming the offending key; cheap, runs before any allocation."""
  def check(cond, key, msg):
    if not cond:
      raise ValueError(f"config key '{prefix}.{key}' {msg}")

  check(c.variant in VARIANTS, "variant", f"is {c.variant!r}; expected one of {list(VARIANTS)}")
  if c.depths is not None:
    check(len(c.depths) == 4 and all(isinstance(d, int) and d >= 1 for d in c.depths),
          "depths", f"must be 4 positive ints (blocks per stage), got {c.depths!r}")
  check(len(c.widths) == 4 and all(w >= 1 for w in c.widths), "widths",
        f"must be 4 positive ints (channels per stage), got {c.widths!r}")
  check(len(c.stem_widths) == 4 and all(w >= 1 for w in c.stem_widths), "stem_widths",
        f"must be 4 positive ints (the four stem convs), got {c.stem_widths!r}")
  check(c.group_width >= 1, "group_width", f"must be positive, got {c.group_width}")
  check(0 < c.bottleneck_ratio, "bottleneck_ratio", f"must be positive, got {c.bottleneck_ratio}")
  for w in c.widths:
    check(int(w * c.bottleneck_ratio) >= c.group_width, "group_width",
          f"({c.group_width}) exceeds the bottleneck width int({w} * "
          f"{c.bottleneck_ratio}) of a stage; no group would remain")
  check(0 < c.se_ratio, "se_ratio", f"must be positive, got {c.se_ratio}")
  check(c.activation in ACTIVATION_GAMMA, "activation",
        f"is {c.activation!r}; NFNet needs a known gamma: one of {list(ACTIVATION_GAMMA)}")
  check(c.se_activation in SE_ACTIVATIONS, "se_activation",
        f"is {c.se_activation!r}; expected one of {list(SE_ACTIVATIONS)}")
  check(c.ws_style in WS_STYLES, "ws_style",
        f"is {c.ws_style!r}; expected one of {list(WS_STYLES)}")
  check(c.ws_eps is None or c.ws_eps > 0, "ws_eps", f"must be positive, got {c.ws_eps}")
  check(c.alpha > 0, "alpha", f"must be positive, got {c.alpha}")
  check(0 <= c.stochastic_depth_rate < 1, "stochastic_depth_rate",
        f"must be in [0, 1), got {c.stochastic_depth_rate}")
  check(c.final_conv_mult >= 1, "final_conv_mult", f"must be >= 1, got {c.final_conv_mult}")
  check(c.num_classes >= 0, "num_classes", f"must be >= 0, got {c.num_classes}")
  check(c.dropout_rate is None or 0 <= c.dropout_rate < 1, "dropout_rate",
        f"must be in [0, 1), got {c.dropout_rate}")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static description of one NFBlock, computed from the config."""
  index: int  # across all stages
  stage: int
  in_ch: int
  out_ch: int
  mid_ch: int  # bottleneck width, a multiple of group_width
  groups: int
  stride: int
  beta: float  # 1 / expected std of the block's input
  stochastic_depth_rate: float
  projection: bool  # shortcut goes through a 1x1 conv


def block_specs(config: NFNetConfig) -> list[BlockSpec]:
  """The blocks in order, with DeepMind's beta and stochastic depth schedule.

  expected_std starts at 1, becomes sqrt(std^2 + alpha^2) after each block and
  is reset to 1 (before that growth) after the first block of each stage,
  whose shortcut conv re-normalises the signal.
  """
  depths = variant_depths(config)
  num_blocks = sum(depths)
  specs = []
  in_ch = config.stem_widths[-1]
  expected_std = 1.0
  index = 0
  for stage, (width, depth, stride) in enumerate(zip(config.widths, depths, STAGE_STRIDES)):
    for block_index in range(depth):
      block_stride = stride if block_index == 0 else 1
      mid = int(width * config.bottleneck_ratio)
      groups = mid // config.group_width
      specs.append(BlockSpec(
          index=index, stage=stage, in_ch=in_ch, out_ch=width,
          mid_ch=groups * config.group_width, groups=groups, stride=block_stride,
          beta=1.0 / expected_std,
          stochastic_depth_rate=config.stochastic_depth_rate * index / num_blocks,
          projection=block_stride > 1 or in_ch != width))
      in_ch = width
      index += 1
      if block_index == 0:
        expected_std = 1.0
      expected_std = (expected_std ** 2 + config.alpha ** 2) ** 0.5
  return specs


# --------------------------------------------------------------------------
# Layers


def gamma_activation(name: str):
  """The variance-preserving activation gamma * act(x)."""
  gamma = ACTIVATION_GAMMA[name]
  fns = {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
      "silu": jax.nn.silu,
  }
  fn = fns[name]
  return lambda x: fn(x) * gamma


def se_activation(name: str):
  """Squeeze-excite hidden activation, unscaled (a sigmoid gate follows)."""
  return {
      "relu": jax.nn.relu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "silu": jax.nn.silu,
  }[name]


def standardize_weight(kernel: jax.Array, gain: jax.Array, style: str = "deepmind",
                       eps: Optional[float] = None) -> jax.Array:
  """Scaled weight standardisation of kernel [kh, kw, in, out] with gain [out].

  Each output unit is centred and scaled to variance 1/fan_in so that the conv
  preserves the variance of its input without normalising activations.
    deepmind: (W - mean) * gain / sqrt(max(var * fan_in, eps)), eps 1e-4
    timm:     (W - mean) * gain / sqrt(fan_in * (var + eps)),    eps 1e-5
  Computed in float32 whatever the parameter dtype.
  """
  if style not in WS_STYLES:
    raise ValueError(f"unknown weight standardisation style {style!r}; "
                     f"expected one of {list(WS_STYLES)}")
  eps = WS_STYLES[style] if eps is None else eps
  w = kernel.astype(jnp.float32)
  gain = gain.astype(jnp.float32)
  fan_in = int(np.prod(w.shape[:-1]))
  # Mean and biased variance over (kh, kw, in), as jnp.var and torch's batch_norm.
  axes = tuple(range(w.ndim - 1))
  mean = jax.lax.reduce_sum(w, axes) / fan_in
  centred = w - mean
  var = jax.lax.reduce_sum(centred * centred, axes) / fan_in
  if style == "deepmind":
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
    return w * scale - mean * scale
  scale = jax.lax.rsqrt(var + eps) * (gain * fan_in ** -0.5)
  return centred * scale


class WSConv(nn.Module):
  """Conv2D with scaled weight standardisation, learnable gain and bias.

  x [B, H, W, Cin] -> [B, H/stride, W/stride, features], TF 'SAME' padding
  (asymmetric for strided convs, as DeepMind and timm's ScaledStdConv2dSame).
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  ws_style: str = "deepmind"
  ws_eps: Optional[float] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_ch = x.shape[-1]
    if in_ch % self.groups:
      raise ValueError(f"{self.name}: {in_ch} input channels are not divisible into "
                       f"{self.groups} groups")
    k = self.kernel_size
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "normal"), CONV_AXES),
        (k, k, in_ch // self.groups, self.features), self.param_dtype)
    gain = self.param("gain", nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                      (self.features,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (self.features,), self.param_dtype)
    w = standardize_weight(kernel, gain, self.ws_style, self.ws_eps).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), w, window_strides=(self.stride, self.stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
    return y + bias.astype(self.dtype)


class SqueezeExcite(nn.Module):
  """x [B, H, W, C] -> gate [B, 1, 1, C] = sigmoid(fc1(act(fc0(mean_hw(x)))))."""
  hidden: int
  activation: str = "relu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    h = _SEDense(self.hidden, self.dtype, self.param_dtype, name="fc0")(h)
    h = _SEDense(c, self.dtype, self.param_dtype, name="fc1")(se_activation(self.activation)(h))
    return jax.nn.sigmoid(h)[:, None, None, :]


class _SEDense(nn.Module):
  """Dense layer over channels: [B, Cin] -> [B, features]."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               ("conv_in", "conv_out")),
        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                      (self.features,), self.param_dtype)
    return x @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class NFBlock(nn.Module):
  """Pre-activation bottleneck block: x [B, H, W, Cin] -> [B, H/s, W/s, Cout].

  out = act(x) * beta; branch = conv2(act(conv1b(act(conv1(act(conv0(out)))))))
  branch = 2 * SE(branch) * branch, stochastic depth, times skip_gain (init 0);
  result = branch * alpha + shortcut, shortcut = x, or conv_shortcut(out) on a
  channel change, or conv_shortcut(avgpool2x2(out)) in strided blocks.
  """
  config: NFNetConfig
  spec: BlockSpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, beta=None):
    """beta: this block's 1 / expected input std when traced (a scan over a stage's
    blocks, which differ only in beta); None: spec.beta."""
    c, s = self.config, self.spec
    act = gamma_activation(c.activation)
    conv = lambda features, name, kernel_size=1, stride=1, groups=1: WSConv(  # noqa: E731
        features, kernel_size, stride, groups, c.ws_style, c.ws_eps, self.dtype,
        self.param_dtype, name=name)
    out = act(x) * jnp.asarray(s.beta if beta is None else beta, x.dtype)
    if s.stride > 1:
      # Average over the valid part of each window at odd sizes, as Haiku's
      # SAME avg_pool and timm's AvgPool2d(ceil_mode, count_include_pad=False).
      pooled = nn.avg_pool(out, (2, 2), strides=(s.stride, s.stride), padding="SAME",
                           count_include_pad=False)
      shortcut = conv(s.out_ch, "conv_shortcut")(pooled)
    elif s.projection:
      shortcut = conv(s.out_ch, "conv_shortcut")(out)
    else:
      shortcut = x
    h = conv(s.mid_ch, "conv0")(out)
    h = conv(s.mid_ch, "conv1", 3, s.stride, s.groups)(act(h))
    h = conv(s.mid_ch, "conv1b", 3, 1, s.groups)(act(h))
    h = conv(s.out_ch, "conv2")(act(h))
    se_hidden = max(1, int(s.out_ch * c.se_ratio))
    gate = SqueezeExcite(se_hidden, c.se_activation, self.dtype, self.param_dtype,
                         name="se")(h)
    h = (gate * 2) * h
    h = self._stochastic_depth(h, train)
    skip_gain = self.param("skip_gain", nn.with_logical_partitioning(nn.initializers.zeros, ()),
                           (), self.param_dtype)
    h = h * skip_gain.astype(h.dtype)
    return h * jnp.asarray(c.alpha, h.dtype) + shortcut

  def _stochastic_depth(self, h, train):
    """Drops the whole branch per example with probability rate (train only)."""
    rate = self.spec.stochastic_depth_rate
    if not train or rate <= 0 or not self.has_rng("dropout"):
      return h
    r = jax.random.uniform(self.make_rng("dropout"), (h.shape[0], 1, 1, 1), jnp.float32)
    keep = jnp.floor(1.0 - rate + r)
    if self.config.stochastic_depth_rescale:
      keep = keep / (1.0 - rate)
    return h * keep.astype(h.dtype)


# --------------------------------------------------------------------------
# Model


class NFNet(nn.Module):
  """NFNet: images [B, H, W, C] -> (features [B, h, w, D], pooled [B, D], logits).

  h, w = ceil(H / 32), ceil(W / 32); D = nfnet_feature_dim(config) (3072, or
  widths[-1] with final_conv=False); logits [B, num_classes] or None when
  num_classes == 0. `features` are activated (act(final_conv(x)), as timm's
  forward_features and DeepMind's head). Stochastic depth and head dropout run
  only with train=True and a 'dropout' rng. `dtype` is the compute dtype;
  parameters stay `param_dtype` and weight standardisation runs in float32.
  """
  config: NFNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __call__(self, images, train: bool = False):
    return self.forward(images, train)

  @nn.compact
  def forward(self, images, train: bool = False):
    c = self.config
    validate_nfnet_config(c)
    if images.ndim != 4:
      raise ValueError(f"NFNet expects images [B, H, W, C] (NHWC), got shape {images.shape}")
    act = gamma_activation(c.activation)
    kw = dict(ws_style=c.ws_style, ws_eps=c.ws_eps, dtype=self.dtype,
              param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    for i, (width, stride) in enumerate(zip(c.stem_widths, STEM_STRIDES)):
      if i:
        x = act(x)
      x = WSConv(width, 3, stride, name=f"stem_conv{i}", **kw)(x)
    block = nn.remat(NFBlock, static_argnums=(2,)) if c.remat else NFBlock
    specs = block_specs(c)
    if train or self.is_initializing():
      for spec in specs:
        x = block(c, spec, self.dtype, self.param_dtype, name=f"block_{spec.index}")(x, train)
    else:  # inference (a frozen encoder): a stage's blocks after its first under one scan
      for stage in sorted({spec.stage for spec in specs}):
        first, *rest = [spec for spec in specs if spec.stage == stage]
        x = block(c, first, self.dtype, self.param_dtype, name=f"block_{first.index}")(x, False)
        x = self._scan_blocks(x, rest)
    if c.final_conv:
      x = WSConv(nfnet_feature_dim(c), 1, name="final_conv", **kw)(x)
    features = act(x)
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    logits = None
    if c.num_classes:
      h = pooled
      rate = variant_dropout_rate(c)
      if train and rate > 0 and self.has_rng("dropout"):
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, h.shape)
        h = jnp.where(keep, h / (1.0 - rate), 0.0)
      logits = _Classifier(c.num_classes, self.dtype, self.param_dtype, name="classifier")(h)
    return features, pooled.astype(features.dtype), logits

  def _scan_blocks(self, x, specs: list[BlockSpec]):
    """Blocks of one stage that keep its shape (stride 1, no projection), in
    inference, as one lax.scan over their params stacked at apply time (the
    param tree keeps `block_{i}`): compile time does not grow with depth
    (NFNet-F6 has 84 blocks). Same computation as calling them in turn."""
    if not specs:
      return x
    params = self.variables["params"]
    stacked = jax.tree.map(lambda *a: jnp.stack(a),
                           *[params[f"block_{spec.index}"] for spec in specs])
    betas = jnp.asarray([spec.beta for spec in specs], jnp.float32)
    template = NFBlock(self.config, specs[0], self.dtype, self.param_dtype, parent=None)

    def body(h, xs):
      return template.apply({"params": xs[0]}, h, False, xs[1])

    if self.config.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.scan(lambda h, xs: (body(h, xs), None), x, (stacked, betas))[0]


class _Classifier(nn.Module):
  """pooled [B, D] -> logits [B, num_classes]; kernel init N(0, 0.01) as DeepMind and timm."""
  num_classes: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.normal(0.01), ("embed", "vocab")),
        (x.shape[-1], self.num_classes), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (self.num_classes,), self.param_dtype)
    return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class NFNetEncoder(NFNet):
  """The Flamingo vision encoder: images [B, H, W, 3] -> features [B, h, w, D].

  Same parameters as NFNet; only the feature grid is returned.
  """

  def __call__(self, images, train: bool = False):
    return self.forward(images, train)[0]


@register_vision_encoder("nfnet", feature_dim=lambda vision_config: nfnet_feature_dim(
    vision_config.nfnet))
def make_nfnet(vision_config, dtype=jnp.float32, param_dtype=jnp.float32) -> NFNetEncoder:
  """Factory for the registry: `model.vision.name = "nfnet"`."""
  validate_nfnet_config(vision_config.nfnet)
  return NFNetEncoder(vision_config.nfnet, dtype=dtype, param_dtype=param_dtype)


def count_params(config: NFNetConfig) -> int:
  """Number of parameters, from shapes only (jax.eval_shape, no allocation)."""
  model = NFNet(config)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
