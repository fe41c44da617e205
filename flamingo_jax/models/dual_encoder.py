"""The dual encoder of Flamingo's vision pretraining, and its contrastive loss.

Paper appendix B.1.3 (after CLIP and ALIGN): a vision tower (NFNet-F6, or any
registered encoder) and a BERT-style text tower, each mean-pooled (the text
over real tokens only), linearly projected to a shared space (1376 dims),
L2-normalised and compared by dot product times a trainable inverse
temperature. The loss is the sum of the text->image and image->text cross
entropies over the batch, with label smoothing 0.1.

The vision tower is built exactly as Flamingo builds it
(`build_vision_encoder(config.vision)`, under the name `vision`), so
`params["vision"]` is the `vision` subtree a Flamingo model with the same
vision config expects, and is what the trainer exports for it.

Parameters: vision/..., text/... (models/text_encoder.py),
vision_projection/kernel [C, E] ('visual_embed', 'projection'),
text_projection/kernel [D, E] ('embed', 'projection'),
log_inverse_temperature [] (float32 whatever param_dtype). 'projection' has
no default sharding rule (replicated, FSDP fallback applies).

Inverse temperature: beta = min(exp(t), max_inverse_temperature), t
initialised to log(1 / 0.07) as CLIP. The trainer also clips t itself after
every update (`clip_temperature`, as OpenCLIP clamps it in place), so t never
sits above the cap where its gradient would be zero.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flamingo_jax.models.config import VisionConfig
from flamingo_jax.models import layers
from flamingo_jax.models.text_encoder import (TextEncoder, TextEncoderConfig, masked_mean,
                                              validate_text_config)
from flamingo_jax.models.vision import build_vision_encoder, vision_encoder_names

TEMPERATURE = "log_inverse_temperature"


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
  """`model` section of a contrastive config. Defaults: the paper's F6 setup."""
  vision: VisionConfig = VisionConfig(name="nfnet", image_size=288)
  text: TextEncoderConfig = TextEncoderConfig()
  embed_dim: int = 1376  # the shared space
  init_inverse_temperature: float = 1.0 / 0.07  # CLIP
  max_inverse_temperature: float = 100.0  # CLIP's cap
  dtype: str = "float32"  # compute dtype of the towers; similarities are float32
  param_dtype: str = "float32"


def validate_dual_encoder_config(c: DualEncoderConfig) -> None:
  """Raises ValueError naming the offending key; allocates nothing."""
  names = vision_encoder_names()
  if c.vision.name not in names:
    raise ValueError(f"config key 'model.vision.name' is {c.vision.name!r}; the dual encoder "
                     f"needs a registered image encoder: one of {names}")
  if c.vision.name == "nfnet":
    from flamingo_jax.models.nfnet import validate_nfnet_config
    validate_nfnet_config(c.vision.nfnet)
  if c.vision.image_size < 1:
    raise ValueError(f"config key 'model.vision.image_size' must be positive, got "
                     f"{c.vision.image_size}")
  validate_text_config(c.text)
  if c.embed_dim < 1:
    raise ValueError(f"config key 'model.embed_dim' must be positive, got {c.embed_dim}")
  if not 0 < c.max_inverse_temperature:
    raise ValueError(f"config key 'model.max_inverse_temperature' must be positive, got "
                     f"{c.max_inverse_temperature}")
  if not 0 < c.init_inverse_temperature <= c.max_inverse_temperature:
    raise ValueError(f"config key 'model.init_inverse_temperature' must be in (0, "
                     f"model.max_inverse_temperature={c.max_inverse_temperature}], got "
                     f"{c.init_inverse_temperature}")
  for key in ("dtype", "param_dtype"):
    if getattr(c, key) not in ("float32", "bfloat16"):
      raise ValueError(f"config key 'model.{key}' is {getattr(c, key)!r}; expected "
                       "'float32' or 'bfloat16'")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x [..., E] -> x / ||x|| in float32 (a zero vector stays zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class DualEncoder(nn.Module):
  """images [B, H, W, 3], tokens [B', L], mask [B', L] -> (logits [B, B'], aux).

  logits[i, j] = beta * <image_i, text_j> with unit-norm embeddings; aux holds
  'image_embeddings' [B, E], 'text_embeddings' [B', E] (float32, unit norm)
  and 'inverse_temperature' (beta, a scalar).
  """
  config: DualEncoderConfig

  def setup(self):
    c = self.config
    validate_dual_encoder_config(c)
    kw = dict(dtype=layers.dtype_of(c.dtype), param_dtype=layers.dtype_of(c.param_dtype))
    self.vision = build_vision_encoder(c.vision, **kw)
    self.text = TextEncoder(c.text, **kw)
    self.vision_projection = layers.Dense(c.embed_dim, ("visual_embed", "projection"), **kw)
    self.text_projection = layers.Dense(c.embed_dim, ("embed", "projection"), **kw)
    self.log_inverse_temperature = self.param(
        TEMPERATURE, nn.with_logical_partitioning(
            nn.initializers.constant(math.log(c.init_inverse_temperature)), ()),
        (), jnp.float32)

  def embed_images(self, images, train: bool = False):
    """images [B, H, W, 3] -> unit-norm embeddings [B, E] float32 (mean-pooled grid)."""
    layers.check_rank("images", images, 4, "[B, H, W, 3]")
    if images.shape[-1] != 3:
      raise ValueError(f"images must have 3 channels in the last axis, got shape "
                       f"{tuple(images.shape)}")
    grid = self.vision(images, train=train)  # [B, h, w, C]
    pooled = jnp.mean(grid.astype(jnp.float32), axis=(1, 2))
    return l2_normalize(self.vision_projection(pooled))

  def embed_texts(self, tokens, mask):
    """tokens [B, L] int, mask [B, L] bool -> unit-norm embeddings [B, E] float32."""
    hidden = self.text(tokens, mask)
    return l2_normalize(self.text_projection(masked_mean(hidden, mask)))

  def inverse_temperature(self):
    """beta = min(exp(t), max_inverse_temperature), a float32 scalar."""
    return jnp.minimum(jnp.exp(self.log_inverse_temperature),
                       self.config.max_inverse_temperature)

  def __call__(self, images, tokens, mask, train: bool = False):
    image_emb = self.embed_images(images, train)
    text_emb = self.embed_texts(tokens, mask)
    beta = self.inverse_temperature()
    logits = beta * jnp.einsum("ie,te->it", image_emb, text_emb,
                               preferred_element_type=jnp.float32)
    return logits, {"image_embeddings": image_emb, "text_embeddings": text_emb,
                    "inverse_temperature": beta}


def contrastive_loss(logits: jax.Array, label_smoothing: float = 0.1):
  """logits [B, B] (image i vs text j; pair i is the positive) -> (loss, metrics).

  loss = CE_image->text + CE_text->image, each the batch mean of a softmax
  cross entropy against targets (1 - s) * onehot + s / B (label smoothing s).
  metrics: the two terms and the in-batch top-1 accuracy of each direction.
  """
  if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
    raise ValueError(f"contrastive logits must be square [B, B], got shape "
                     f"{tuple(logits.shape)}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  b = logits.shape[0]
  logits = logits.astype(jnp.float32)
  targets = optax.smooth_labels(jnp.eye(b, dtype=jnp.float32), label_smoothing)
  i2t = jnp.mean(optax.softmax_cross_entropy(logits, targets))
  t2i = jnp.mean(optax.softmax_cross_entropy(logits.T, targets))
  labels = jnp.arange(b)
  return i2t + t2i, {
      "loss_image_to_text": i2t, "loss_text_to_image": t2i,
      "accuracy_image_to_text": jnp.mean(jnp.argmax(logits, axis=1) == labels),
      "accuracy_text_to_image": jnp.mean(jnp.argmax(logits, axis=0) == labels),
  }


def clip_temperature(params: dict, max_inverse_temperature: float) -> dict:
  """params with log_inverse_temperature clipped to <= log(max) (after an update)."""
  if TEMPERATURE not in params:
    raise ValueError(f"params have no {TEMPERATURE!r}; top-level keys: {sorted(params)}")
  params = dict(params)
  params[TEMPERATURE] = jnp.minimum(params[TEMPERATURE], math.log(max_inverse_temperature))
  return params
