"""The model schema: one frozen dataclass per component (vision, resampler, cross-attention, LM)
and FlamingoConfig over them, the LM family presets, cross-field validation and the paper's
models (Table 4).

Users write the `model` section of a config as an ml_collections ConfigDict; `model_config`
turns it into these dataclasses (flamingo_jax.config.from_config_dict), so an unknown or
misspelled key, a wrong type or an inconsistent size fails with an error that names the key,
before any array is allocated.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from flamingo_jax.config import check as _check
from flamingo_jax.config import choice as _choice
from flamingo_jax.config import from_config_dict
from flamingo_jax.errors import ConfigError


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "squared_relu", "silu")
GATED_ACTIVATIONS = ("swiglu", "geglu")


@dataclasses.dataclass(frozen=True)
class NFNetConfig:
  """NFNet-F{0..7} (Brock et al. 2021), as in DeepMind's code and timm.

  Checked by flamingo_jax.models.nfnet.validate_nfnet_config; docs/nfnet.md
  says which options reproduce DeepMind's and timm's numerics.
  """
  variant: str = "F6"
  # Overrides of the variant's blocks per stage / widths, for tiny test models.
  depths: Optional[tuple[int, ...]] = None
  widths: tuple[int, ...] = (256, 512, 1536, 1536)
  stem_widths: tuple[int, ...] = (16, 32, 64, 128)
  group_width: int = 128
  bottleneck_ratio: float = 0.5
  se_ratio: float = 0.5
  se_activation: str = "relu"  # released code; the paper says gelu
  # gelu: exact erf GELU (timm); gelu_tanh: tanh approximation (DeepMind's
  # jax.nn.gelu default); both scaled by gamma = 1.7015043497085571.
  activation: str = "gelu"
  # Scaled weight standardisation: "deepmind" W_hat = (W - mean) * gain /
  # sqrt(max(var * fan_in, eps)), eps 1e-4; "timm" W_hat = (W - mean) * gain /
  # sqrt(fan_in * (var + eps)), eps 1e-5. ws_eps None: the style's eps.
  ws_style: str = "deepmind"
  ws_eps: Optional[float] = None
  alpha: float = 0.2
  stochastic_depth_rate: float = 0.25
  stochastic_depth_rescale: bool = False  # DeepMind: no 1/keep rescaling
  final_conv: bool = True  # 1x1 conv to final_conv_mult * widths[-1] (3072)
  final_conv_mult: int = 2
  num_classes: int = 0  # 0: no classifier head
  dropout_rate: Optional[float] = None  # None: the variant's (F0 0.2 ... F7 0.5)
  remat: bool = False


@dataclasses.dataclass(frozen=True)
class PatchEncoderConfig:
  """A small patchify encoder (conv with stride = patch size, then an MLP).

  Used by tiny configs and tests where an NFNet would be too slow on a CPU.
  """
  patch_size: int = 8
  width: int = 64
  depth: int = 1


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """OpenCLIP / OpenAI CLIP vision transformer (OpenFlamingo's ViT-L/14 by default).

  Features are the patch tokens after ln_post (the class token dropped), as
  OpenFlamingo feeds its resampler. IDEFICS feeds the last block's output as
  it is (transformers' last_hidden_state): include_class_token=True,
  post_layernorm=False; the features are then [B, 1, 1 + P, width] (class
  token first) instead of the patch grid [B, h, w, width].
  """
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  activation: str = "quick_gelu"  # OpenAI-pretrained CLIP; open_clip's own models use gelu
  layernorm_eps: float = 1e-5
  include_class_token: bool = False
  post_layernorm: bool = True  # ln_post on the features (CLIP applies it to the pooled token)


MLLAMA_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@dataclasses.dataclass(frozen=True)
class MllamaVisionConfig:
  """Llama 3.2 Vision's tiled ViT (transformers' MllamaVisionModel, ViT-H/14); the tile
  size is model.vision.image_size (448 base, 560 Instruct). models/mllama_vision.py."""
  patch_size: int = 14
  width: int = 1280
  depth: int = 32  # layers over all tiles of an image, ungated
  global_depth: int = 8  # tanh-gated layers after ln_post and the post-tile embedding
  num_heads: int = 16
  mlp_dim: int = 5120
  activation: str = "gelu"
  layernorm_eps: float = 1e-5  # the layers' (ln_pre / ln_post: 1e-5, torch's default)
  max_num_tiles: int = 4
  # (rows, cols) tile layouts; aspect_ratio_id i + 1 is layout i, 0 a padded image
  aspect_ratios: tuple[tuple[int, int], ...] = MLLAMA_ASPECT_RATIOS
  # outputs of these local layers (0-based) are appended to the final features
  intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  name: str = "nfnet"  # a registered encoder: see models/vision.py
  image_size: int = 320
  nfnet: NFNetConfig = NFNetConfig()
  patch: PatchEncoderConfig = PatchEncoderConfig()
  vit: ViTConfig = ViTConfig()
  mllama: MllamaVisionConfig = MllamaVisionConfig()


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
  """Perceiver Resampler: visual features [T, S, d] -> num_latents tokens."""
  # perceiver | mlp | transformer (paper Table 3 ablations) | linear: no resampler,
  # one Dense(d -> width, bias = use_bias) per feature, every frame's (mllama: tile's)
  # S tokens kept: T * S visual tokens per image (mllama's multi_modal_projector).
  kind: str = "perceiver"
  depth: int = 6
  width: int = 1536
  num_heads: int = 16
  head_dim: int = 96  # paper v2: 96; v1: 128
  num_latents: int = 64
  ffw_mult: int = 4
  activation: str = "squared_relu"
  # Project the encoder's features (input_dim) to `width` before resampling.
  # With input_proj=False the features must already be `width` wide.
  input_proj: bool = True
  max_frames: int = 8  # learned temporal embeddings; interpolated beyond
  temporal_embeddings: bool = True
  # Learned embedding per image slot (OpenFlamingo's media_time_embs,
  # flamingo-pytorch's media_pos_emb); 0 disables (the paper has none).
  num_media_embeddings: int = 0
  use_bias: bool = False
  layernorm_eps: float = 1e-5
  # LayerNorm (with bias) of each head's queries and keys after the projections
  # (IDEFICS qk_layer_norms_perceiver).
  qk_layernorm: bool = False


@dataclasses.dataclass(frozen=True)
class XAttnConfig:
  """GATED XATTN-DENSE blocks inserted into the frozen LM."""
  kind: str = "gated_dense"  # gated_dense | vanilla (Table 3 "vanilla xattn")
  every: int = 1  # a block before LM blocks 0, N, 2N, ...
  # paper: before blocks 0, N, ... (also IDEFICS: i % cross_layer_interval
  # == 0); openflamingo: before block i where (i + 1) % N == 0; middle: a
  # single block before the middle LM block.
  placement: str = "paper"
  # placement explicit: the LM block indices, strictly increasing, that get a block
  # before them (mllama: HF's merged cross_attention_layers c_0 < c_1 < ... become
  # c_k - k, see mllama_layer_indices).
  layers: tuple[int, ...] = ()
  num_heads: int = 16
  head_dim: int = 128
  num_kv_heads: int = 0  # 0: num_heads; fewer: grouped-query cross-attention (mllama)
  ffw_mult: int = 4
  ffw_dim: int = 0  # FFW hidden width; 0: ffw_mult * LM width (IDEFICS: its intermediate_size)
  activation: str = "squared_relu"  # or swiglu / geglu (IDEFICS: swiglu, the LM's MLP)
  gating: str = "tanh"  # tanh | none (Table 3 "w/o tanh gating")
  gate_shape: str = "scalar"  # scalar | vector (one gate per channel)
  # last | all (Table 10 "all previous images") | group: the last image and the
  # images of its run of consecutive `<image>` tokens (mllama's processor)
  attend_previous: str = "last"
  # What a text token with no image to attend to gets (the paper is silent):
  #   zero_attention: attention weights 0 (out = out-proj of 0), FFW still
  #                   applied (OpenFlamingo);
  #   zero_output:    cross-attention output 0 after its out-projection, FFW
  #                   still applied (IDEFICS);
  #   skip:           the whole gated block is the identity for that token
  #                   (mllama as Meta runs it: row mask on attention and FFW);
  #   attend_all:     the token attends to every visual token of its row,
  #                   unmasked, and its FFW output is 0 (mllama as transformers
  #                   runs it: row mask on the FFW output only, issue #39379).
  no_image: str = "zero_attention"
  query_layernorm: bool = True
  kv_layernorm: bool = True  # paper v1; OpenFlamingo has none
  ffw_layernorm: bool = True
  # The kind of those three norms: layernorm (paper, OpenFlamingo) or rmsnorm
  # (IDEFICS, like its LM).
  norm: str = "layernorm"
  # Normalise each head's queries and keys after the projections, with `norm`
  # (IDEFICS qk_layer_norms).
  qk_norm: bool = False
  use_bias: bool = False
  layernorm_eps: float = 1e-5
  # Initial gate alphas: zeros (paper: the model starts as the frozen LM),
  # ones, or normal(0, gate_init_std) (IDEFICS alpha_initializer).
  gate_init: str = "zeros"
  gate_init_std: float = 0.0


def xattn_layer_indices(num_layers: int, every: int, placement: str,
                        layers: tuple[int, ...] = ()) -> list[int]:
  """LM block indices that get a GATED XATTN-DENSE block *before* them.

  paper:        0, N, 2N, ...        (9B: 0, 4, ..., 36; 80B: 0, 7, ..., 77; IDEFICS)
  openflamingo: i with (i + 1) % N == 0  (N-1, 2N-1, ...)
  middle:       one block before num_layers // 2 (Table 3 "single in middle")
  explicit:     `layers` as given (mllama)
  """
  if placement == "explicit":
    return list(layers)
  if placement == "paper":
    return list(range(0, num_layers, every))
  if placement == "openflamingo":
    return [i for i in range(num_layers) if (i + 1) % every == 0]
  if placement == "middle":
    return [num_layers // 2]
  raise ValueError(f"unknown model.xattn.placement {placement!r}")


def xattn_indices(config: "FlamingoConfig") -> list[int]:
  """`xattn_layer_indices` of a FlamingoConfig."""
  x = config.xattn
  return xattn_layer_indices(config.lm.num_layers, x.every, x.placement, x.layers)


def mllama_layer_indices(cross_attention_layers, num_lm_layers: int) -> tuple[int, ...]:
  """transformers' mllama `cross_attention_layers` (indices in one merged list of
  self- and cross-attention layers) -> our LM block indices: the k-th cross layer
  (sorted) at merged index c_k reads the output of c_k - k self-attention layers,
  so it is a block before LM block c_k - k (11B: 3, 8, ..., 38 -> 3, 7, ..., 31).
  A cross layer after the last self-attention layer, or two in a row, has no such
  place: a ConfigError naming them."""
  merged = sorted(int(c) for c in cross_attention_layers)
  out = tuple(c - k for k, c in enumerate(merged))
  bad = [c for c, i in zip(merged, out) if i >= num_lm_layers]
  _check(not bad and len(set(out)) == len(out),
         f"mllama cross_attention_layers {merged}: a cross-attention layer must come right "
         f"before a self-attention layer, one per place (got LM positions {list(out)} of "
         f"{num_lm_layers})")
  return out


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Decoder-only LM. `lm_preset(family, ...)` fills a family's defaults."""
  family: str = "chinchilla"  # chinchilla | llama | gpt2 | gpt_neox | mpt | qwen2 | gemma
  vocab_size: int = 32000
  num_layers: int = 24
  width: int = 2048
  num_heads: int = 16
  head_dim: int = 128
  num_kv_heads: int = 0  # 0: same as num_heads; fewer: grouped-query attention
  ffw_dim: int = 0  # 0: ffw_mult * width
  ffw_mult: int = 4
  activation: str = "gelu"  # or swiglu / geglu for gated FFW
  norm: str = "layernorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5
  norm_bias: bool = True  # LayerNorm with a bias (MPT has none)
  positions: str = "rotary"  # rotary | learned | alibi | none
  rotary_base: float = 10000.0
  # Rotate only the first rotary_dim dims of each head (GPT-NeoX rotary_pct);
  # 0: the whole head.
  rotary_dim: int = 0
  # ALiBi (MPT): head h adds -slope_h * distance to its attention logits,
  # slopes 2^(-alibi_bias_max * i / H') as in MosaicML's build_alibi_bias.
  alibi_bias_max: float = 8.0
  # Rotary frequency scaling for long contexts (models/rotary.py): none |
  # linear (frequencies / factor) | llama3 (Llama 3.1: low frequencies / factor,
  # high ones kept, a smooth band between, set by the original context length).
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_length: int = 8192
  # Mistral: a token attends to itself and the previous sliding_window - 1
  # tokens (positions, so padding does not count); 0: the whole prefix.
  sliding_window: int = 0
  attention_scale: float = 0.0  # softmax temperature on q.k; 0: head_dim ** -0.5
  max_length: int = 2048  # for learned positions
  use_bias: bool = False  # biases in attention and FFW projections
  qkv_bias: bool = False  # biases on the query/key/value projections only (Qwen2)
  # LayerNorm over the whole query and key width before the head split
  # (mosaic_gpt's attn_qk_ln, MPT-1B-RedPajama in OpenFlamingo-3B).
  qk_norm: bool = False
  tie_embeddings: bool = True
  parallel_residual: bool = False  # GPT-NeoX style attn and FFW in parallel
  embedding_scale: float = 1.0  # multiply token embeddings (Gemma-style sqrt(D))
  # Rows of the LM's own input / output embedding matrices; 0: vocab_size. Fewer:
  # the ids from embedding_rows up (only <image> / <EOC>, with their trainable
  # rows in new_token_*) are a Flamingo's growth of a pretrained LM's vocabulary,
  # and the LM's checkpoint loads as converted (configs/from_hf_lm.py).
  embedding_rows: int = 0


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
  vision: VisionConfig = VisionConfig()
  # Width C of the vision features fed to the resampler; derived from the
  # encoder config when 0, required when the model runs on precomputed features.
  vision_feature_dim: int = 0
  resampler: ResamplerConfig = ResamplerConfig()
  xattn: XAttnConfig = XAttnConfig()
  lm: LMConfig = LMConfig()
  image_token_id: int = 32000 - 2
  eoc_token_id: int = 32000 - 1
  # A token after which text sees no image until the next <image> (IDEFICS:
  # `</s>`, so a packed document never sees the previous one's image); the
  # token itself still sees its image. -1: none (the paper, OpenFlamingo).
  image_reset_token_id: int = -1
  # Give <image> and <EOC> trainable rows in both the input and output
  # embeddings (the frozen LM's rows for those ids are then unused).
  train_new_token_embeddings: bool = True
  # Trainable input-embedding rows for the ids lm.embedding_rows .. lm.vocab_size
  # (param `new_token_extra_embeddings`, component new_tokens) without output rows:
  # the head cannot emit those ids (lowest logit). mllama: 8 rows after Llama 3.1's
  # 128256, `<|image|>` = 128256 the first. 0: none.
  extra_token_rows: int = 0
  # Components whose parameters get no update (and no optimizer state).
  frozen: tuple[str, ...] = ("vision", "lm")
  # Parameter paths (regexes over "component/sub/.../leaf") without weight
  # decay. Paper: every trainable parameter decays except the resampler.
  no_weight_decay: tuple[str, ...] = ("resampler/.*",)
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  remat: str = "none"  # none | block | dots (activation checkpointing per block)
  # Run the LM blocks and the GATED XATTN-DENSE blocks under a scan over stacked
  # parameters (a leading `layers` axis: `lm/blocks`, `xattn_blocks`), so compile
  # time does not grow with depth; False: one module per block (`lm/blocks_{i}`,
  # `xattn_block_{i}`). Checkpoints of either layout load into both
  # (models/layer_stack.py).
  scan_layers: bool = False
  # Attention kernel: xla (einsum + float32 softmax, the reference) | cudnn
  # (jax.nn.dot_product_attention on GPU) | splash (Pallas kernel on TPU) | blocked
  # (the LM's causal self-attention by query blocks, any backend) | auto
  # (cudnn on GPU, splash on TPU, xla elsewhere). Decoding keeps the xla path.
  attention: str = "xla"


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "blocked", "auto")

COMPONENTS = ("vision", "resampler", "xattn", "lm", "new_tokens")

LM_FAMILIES = {
    # The paper's frozen LM as the Flamingo paper describes it.
    "chinchilla": dict(norm="layernorm", activation="gelu", positions="rotary",
                       use_bias=False, tie_embeddings=True, norm_eps=1e-5),
    "llama": dict(norm="rmsnorm", activation="swiglu", positions="rotary", use_bias=False,
                  tie_embeddings=False, norm_eps=1e-6),
    "gpt2": dict(norm="layernorm", activation="gelu_tanh", positions="learned", use_bias=True,
                 tie_embeddings=True, norm_eps=1e-5, max_length=1024),
    # Pythia, RedPajama-INCITE (OpenFlamingo-4B): the converter sets rotary_dim
    # from rotary_pct (Pythia 0.25, RedPajama 1.0).
    "gpt_neox": dict(norm="layernorm", activation="gelu", positions="rotary", use_bias=True,
                     tie_embeddings=False, norm_eps=1e-5, parallel_residual=True),
    # MPT-7B (OpenFlamingo-9B): ALiBi, no biases anywhere, tied embeddings.
    "mpt": dict(norm="layernorm", norm_bias=False, activation="gelu", positions="alibi",
                use_bias=False, tie_embeddings=True, norm_eps=1e-5, alibi_bias_max=8.0),
    # Qwen2 / Qwen2.5: Llama with biases on q/k/v only.
    "qwen2": dict(norm="rmsnorm", activation="swiglu", positions="rotary", use_bias=False,
                  qkv_bias=True, tie_embeddings=False, norm_eps=1e-6),
    # Gemma (1): GeGLU, tied embeddings scaled by sqrt(width) on input (the
    # converter sets embedding_scale), RMSNorm's (1 + w) stored as the scale.
    "gemma": dict(norm="rmsnorm", activation="geglu", positions="rotary", use_bias=False,
                  tie_embeddings=True, norm_eps=1e-6),
}


def lm_preset(family: str, **overrides) -> LMConfig:
  """An LMConfig with `family`'s conventions and the given sizes."""
  if family not in LM_FAMILIES:
    raise ConfigError(f"unknown LM family {family!r}; expected one of {sorted(LM_FAMILIES)}")
  return LMConfig(family=family, **{**LM_FAMILIES[family], **overrides})


def model_config(cfg) -> FlamingoConfig:
  """The validated FlamingoConfig of a ConfigDict (its `model` field) or dict."""
  if isinstance(cfg, FlamingoConfig):
    config = cfg
  else:
    if hasattr(cfg, "model") and not isinstance(cfg, dict):
      cfg = cfg.model
    config = from_config_dict(FlamingoConfig, cfg, "model")
  validate(config)
  return config


def validate(c: FlamingoConfig) -> None:
  """Cross-field checks; every message names the offending key."""
  for check_part in (_validate_vision_and_resampler, _validate_xattn, _validate_lm_and_sizes,
                     _validate_tokens):
    check_part(c)


def _validate_vision_and_resampler(c: FlamingoConfig) -> None:
  """The vision encoder's options and the resampler (or projector) that reads it."""
  r = c.resampler
  _choice(r.kind, ("perceiver", "mlp", "transformer", "linear"), "model.resampler.kind")
  if c.vision.name == "mllama":
    mv = c.vision.mllama
    _check(c.vision.image_size % mv.patch_size == 0 and mv.width % mv.num_heads == 0,
           f"config keys 'model.vision.image_size' ({c.vision.image_size}) and "
           f"'model.vision.mllama.width' ({mv.width}) must be multiples of the patch size "
           f"({mv.patch_size}) and of num_heads ({mv.num_heads})")
    _check(all(0 <= i < mv.depth for i in mv.intermediate_layers),
           f"config key 'model.vision.mllama.intermediate_layers' "
           f"{tuple(mv.intermediate_layers)} must index the {mv.depth} local layers")
    _check(all(r_ * c_ <= mv.max_num_tiles for r_, c_ in mv.aspect_ratios),
           f"config key 'model.vision.mllama.aspect_ratios' {tuple(mv.aspect_ratios)} has a "
           f"layout of more than model.vision.mllama.max_num_tiles = {mv.max_num_tiles} tiles")
    _check(r.kind == "linear", "model.vision.name 'mllama' gives every tile's tokens: it needs "
           "config key 'model.resampler.kind' = 'linear'")
  _check(r.kind != "linear" or not (r.temporal_embeddings or r.num_media_embeddings),
         "config keys 'model.resampler.temporal_embeddings' / 'num_media_embeddings' must be "
         "off with model.resampler.kind 'linear' (a projection only)")
  _choice(r.activation, ACTIVATIONS, "model.resampler.activation")


def _validate_xattn(c: FlamingoConfig) -> None:
  """The cross-attention blocks: kind, placement, heads, gating, masking."""
  x, lm = c.xattn, c.lm
  _choice(x.kind, ("gated_dense", "vanilla"), "model.xattn.kind")
  _choice(x.placement, ("paper", "openflamingo", "middle", "explicit"),
          "model.xattn.placement")
  _check(x.placement != "explicit" or (
      len(x.layers) > 0 and list(x.layers) == sorted(set(x.layers))
      and 0 <= x.layers[0] and x.layers[-1] < lm.num_layers),
         f"config key 'model.xattn.layers' {tuple(x.layers)} must be strictly increasing LM "
         f"block indices in [0, model.lm.num_layers = {lm.num_layers}) with placement "
         "'explicit'")
  _check(x.placement == "explicit" or not x.layers,
         "config key 'model.xattn.layers' is set but model.xattn.placement is not 'explicit'")
  _check(x.num_kv_heads >= 0 and x.num_heads % (x.num_kv_heads or x.num_heads) == 0,
         f"config key 'model.xattn.num_kv_heads' ({x.num_kv_heads}) must divide "
         f"model.xattn.num_heads ({x.num_heads})")
  _choice(x.activation, ACTIVATIONS + GATED_ACTIVATIONS, "model.xattn.activation")
  _choice(x.norm, ("layernorm", "rmsnorm"), "model.xattn.norm")
  _choice(x.gate_init, ("zeros", "ones", "normal"), "model.xattn.gate_init")
  _check(x.gate_init_std >= 0,
         f"config key 'model.xattn.gate_init_std' must be >= 0, got {x.gate_init_std}")
  _check(x.ffw_dim >= 0, f"config key 'model.xattn.ffw_dim' must be >= 0 (0: ffw_mult * "
         f"model.lm.width), got {x.ffw_dim}")
  _choice(x.gating, ("tanh", "none"), "model.xattn.gating")
  _choice(x.gate_shape, ("scalar", "vector"), "model.xattn.gate_shape")
  _choice(x.attend_previous, ("last", "all", "group"), "model.xattn.attend_previous")
  _choice(x.no_image, ("zero_attention", "zero_output", "skip", "attend_all"),
          "model.xattn.no_image")
  _check(x.no_image != "attend_all" or x.kind == "gated_dense",
         "config key 'model.xattn.no_image' 'attend_all' masks the FFW output: it needs "
         "model.xattn.kind 'gated_dense'")


def _validate_lm_and_sizes(c: FlamingoConfig) -> None:
  """The LM's options, the dtypes and every size that must be positive."""
  r, x, lm = c.resampler, c.xattn, c.lm
  _choice(lm.family, tuple(LM_FAMILIES), "model.lm.family")
  _choice(lm.activation, ACTIVATIONS + GATED_ACTIVATIONS, "model.lm.activation")
  _choice(lm.norm, ("layernorm", "rmsnorm"), "model.lm.norm")
  _choice(lm.positions, ("rotary", "learned", "alibi", "none"), "model.lm.positions")
  _choice(c.dtype, ("float32", "bfloat16", "float16"), "model.dtype")
  _choice(c.param_dtype, ("float32", "bfloat16"), "model.param_dtype")
  _choice(c.remat, ("none", "block", "dots"), "model.remat")
  _choice(c.attention, ATTENTION_IMPLEMENTATIONS, "model.attention")
  for key, v in [("model.resampler.depth", r.depth), ("model.resampler.width", r.width),
                 ("model.resampler.num_heads", r.num_heads),
                 ("model.resampler.head_dim", r.head_dim),
                 ("model.resampler.num_latents", r.num_latents),
                 ("model.xattn.every", x.every), ("model.xattn.num_heads", x.num_heads),
                 ("model.xattn.head_dim", x.head_dim), ("model.lm.num_layers", lm.num_layers),
                 ("model.lm.width", lm.width), ("model.lm.num_heads", lm.num_heads),
                 ("model.lm.head_dim", lm.head_dim), ("model.lm.vocab_size", lm.vocab_size)]:
    _check(v > 0, f"config key {key!r} must be positive, got {v}")
  kv = lm.num_kv_heads or lm.num_heads
  _check(lm.num_heads % kv == 0,
         f"config key 'model.lm.num_kv_heads' ({kv}) must divide model.lm.num_heads "
         f"({lm.num_heads})")
  _check(lm.positions != "rotary" or lm.head_dim % 2 == 0,
         "config key 'model.lm.head_dim' must be even with rotary positions")
  _check(0 <= lm.rotary_dim <= lm.head_dim and lm.rotary_dim % 2 == 0,
         f"config key 'model.lm.rotary_dim' ({lm.rotary_dim}) must be even and in "
         f"[0, model.lm.head_dim = {lm.head_dim}]")
  _check(lm.positions != "alibi" or lm.alibi_bias_max > 0,
         f"config key 'model.lm.alibi_bias_max' must be positive, got {lm.alibi_bias_max}")
  _check(lm.attention_scale >= 0,
         f"config key 'model.lm.attention_scale' must be >= 0, got {lm.attention_scale}")
  _choice(lm.rope_scaling, ("none", "linear", "llama3"), "model.lm.rope_scaling")
  _check(lm.rope_scaling == "none" or lm.rope_scaling_factor > 0,
         f"config key 'model.lm.rope_scaling_factor' must be positive, got "
         f"{lm.rope_scaling_factor}")
  _check(lm.rope_scaling != "llama3" or lm.rope_high_freq_factor > lm.rope_low_freq_factor > 0,
         f"config keys 'model.lm.rope_low_freq_factor' ({lm.rope_low_freq_factor}) and "
         f"'model.lm.rope_high_freq_factor' ({lm.rope_high_freq_factor}) must satisfy "
         "0 < low < high")
  _check(lm.sliding_window >= 0,
         f"config key 'model.lm.sliding_window' must be >= 0 (0: none), got {lm.sliding_window}")


def _validate_tokens(c: FlamingoConfig) -> None:
  """The vocabulary's rows and the special token ids."""
  r, lm = c.resampler, c.lm
  rows = lm.embedding_rows or lm.vocab_size
  _check(0 <= lm.embedding_rows <= lm.vocab_size,
         f"config key 'model.lm.embedding_rows' ({lm.embedding_rows}) must be in "
         f"[0, model.lm.vocab_size = {lm.vocab_size}]")
  _check(c.extra_token_rows >= 0, f"config key 'model.extra_token_rows' must be >= 0, got "
         f"{c.extra_token_rows}")
  _check(not c.extra_token_rows or rows + c.extra_token_rows == lm.vocab_size,
         f"config key 'model.extra_token_rows' ({c.extra_token_rows}) must equal "
         f"model.lm.vocab_size ({lm.vocab_size}) - model.lm.embedding_rows ({rows})")
  grown = set(range(rows, lm.vocab_size)) if not c.extra_token_rows else set()
  _check(not grown or (c.train_new_token_embeddings
                       and grown <= {c.image_token_id, c.eoc_token_id}),
         f"config key 'model.lm.embedding_rows' ({lm.embedding_rows}): the ids "
         f"{sorted(grown)[:4]} past the LM's rows must be model.image_token_id / "
         "model.eoc_token_id, with model.train_new_token_embeddings")
  for key, tid in [("model.image_token_id", c.image_token_id),
                   ("model.eoc_token_id", c.eoc_token_id)]:
    _check(0 <= tid < lm.vocab_size,
           f"config key {key!r} = {tid} is outside the vocabulary [0, {lm.vocab_size})")
  for comp in c.frozen:
    _choice(comp, COMPONENTS, "model.frozen")
  _check(c.image_token_id != c.eoc_token_id,
         "config keys 'model.image_token_id' and 'model.eoc_token_id' must differ")
  _check(c.image_reset_token_id == -1 or 0 <= c.image_reset_token_id < lm.vocab_size,
         f"config key 'model.image_reset_token_id' = {c.image_reset_token_id} must be -1 "
         f"(none) or in the vocabulary [0, {lm.vocab_size})")
  _check(c.image_reset_token_id != c.image_token_id,
         "config keys 'model.image_reset_token_id' and 'model.image_token_id' must differ")
  _check(r.input_proj or c.vision_feature_dim in (0, r.width),
         f"config key 'model.resampler.input_proj' is False but the vision features are "
         f"{c.vision_feature_dim} wide and the resampler {r.width}")


# --------------------------------------------------------------------------
# The paper's models (Table 4)

PAPER_SIZES = {
    # size: (LM layers, LM width, LM heads, xattn every)
    "3b": (24, 2048, 16, 1),
    "9b": (40, 4096, 32, 4),
    "80b": (80, 8192, 64, 7),
}
PAPER_VOCAB = 32000  # Chinchilla's SentencePiece vocabulary


def paper_model(size: str, version: str = "v2") -> FlamingoConfig:
  """Flamingo-{3B,9B,80B} as in paper Table 4.

  version: "v2" (head size 96 in the resampler, 128 elsewhere) or "v1" (128
  everywhere). The vocabulary is Chinchilla's 32,000 plus `<image>` and `<EOC>`
  appended at 32000 and 32001 (their rows are trained in `new_token_*`).
  """
  if size not in PAPER_SIZES:
    raise ConfigError(f"unknown Flamingo size {size!r}; expected one of {sorted(PAPER_SIZES)}")
  if version not in ("v1", "v2"):
    raise ConfigError(f"paper version must be 'v1' or 'v2', got {version!r}")
  layers_, width, heads, every = PAPER_SIZES[size]
  vocab = PAPER_VOCAB + 2
  return FlamingoConfig(
      vision=VisionConfig(name="nfnet", image_size=320, nfnet=NFNetConfig(variant="F6")),
      vision_feature_dim=3072,
      resampler=ResamplerConfig(depth=6, width=1536, num_heads=16,
                                head_dim=96 if version == "v2" else 128, num_latents=64,
                                activation="squared_relu", input_proj=True, max_frames=8),
      xattn=XAttnConfig(every=every, placement="paper", num_heads=heads, head_dim=128,
                        activation="squared_relu"),
      lm=lm_preset("chinchilla", vocab_size=vocab, num_layers=layers_, width=width,
                   num_heads=heads, head_dim=128, max_length=2048),
      image_token_id=PAPER_VOCAB,
      eoc_token_id=PAPER_VOCAB + 1,
      # precision: bfloat16 compute, float32 params at init (the trainer keeps the
      # trainable ones, and Adam's moments, in float32); frozen weights are stored
      # in train.frozen_dtype
      dtype="bfloat16",
      param_dtype="float32",
      scan_layers=True,  # compile time flat in depth (80 LM blocks at 80B)
      attention="auto",  # cuDNN flash on GPU, splash on TPU, einsum on CPU
  )
