"""Benchmark model: a ~220M-parameter Llama-style frozen LM with OpenFlamingo's
resampler and cross-attention, on precomputed vision features.

  python benchmarks/train_step.py --configs tiny,bench --openflamingo

Sizes match the PyTorch side of the benchmark (OpenFlamingo's helpers.py
PerceiverResampler and GatedCrossAttentionBlock around a transformers
LlamaForCausalLM): LM d 1024, 12 layers, 16 heads x 64, SwiGLU 2816, vocab
32000, untied; resampler d 1024, depth 6, 8 heads x 64, 64 latents, FFW 4x
GELU, no temporal embeddings; cross-attention before every 2nd LM block
("openflamingo" placement: blocks 1, 3, ..., 11), 8 heads x 64, FFW 4x GELU,
no key/value LayerNorm; 5 images x 100 feature tokens x 1024 per example,
batch 4, sequence 256. The `<image>`/`<EOC>` rows are not trained here (OpenFlamingo
with requires_grad False on the LM trains no embedding rows either). Everything in float32, frozen weights too (the
argument "bf16" computes in bfloat16 with frozen weights stored in bfloat16).
"""
import ml_collections

from flamingo_jax.config import to_config_dict
from flamingo_jax.models.config import FlamingoConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset

VOCAB = 32000


def get_config(arg=None):
  bf16 = arg == "bf16"
  model = FlamingoConfig(
      vision=VisionConfig(name="none"),
      vision_feature_dim=1024,
      resampler=ResamplerConfig(depth=6, width=1024, num_heads=8, head_dim=64, num_latents=64,
                                ffw_mult=4, activation="gelu", input_proj=False,
                                temporal_embeddings=False),
      xattn=XAttnConfig(every=2, placement="openflamingo", num_heads=8, head_dim=64, ffw_mult=4,
                        activation="gelu", kv_layernorm=False, query_layernorm=True,
                        ffw_layernorm=True, no_image="zero_attention"),
      lm=lm_preset("llama", vocab_size=VOCAB, num_layers=12, width=1024, num_heads=16,
                   head_dim=64, ffw_dim=2816),
      image_token_id=VOCAB - 2,
      eoc_token_id=VOCAB - 1,
      # OpenFlamingo with a frozen LM trains the resampler and cross-attention
      # only: the same 125,958,156 parameters on both sides.
      train_new_token_embeddings=False,
      dtype="bfloat16" if bf16 else "float32",
  )
  config = ml_collections.ConfigDict({"model": to_config_dict(model)})
  config.train = dict(total_steps=1000, seed=0, input="synthetic", mixing="accumulate",
                      micro_batches={}, frozen_dtype="bfloat16" if bf16 else "float32",
                      log_every=1, max_consecutive_nonfinite=10, peak_flops_per_device=0.0)
  config.optim = dict(learning_rate=1e-4, warmup_steps=5000, schedule="constant",
                      weight_decay=0.1, clip_norm=1.0)
  config.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1, zero1=False)
  config.checkpoint = dict(every=0, keep=1, async_save=True, enabled=False)
  config.distributed = dict(mode="auto")
  config.model_init = {}
  config.synthetic = dict(
      seed=0, num_classes=8, nan_batches=(), feature_positions=100,
      datasets=dict(interleaved=dict(kind="interleaved", batch_size=4, seq_len=256,
                                     max_images=5, num_frames=1, weight=1.0)))
  return config
