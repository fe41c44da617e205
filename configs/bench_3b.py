"""Flamingo-3B-like benchmark workload for one GPU (benchmarks/gpu_suite.sh).

  python benchmarks/train_step.py --configs bench_3b --openflamingo --torch_device cuda \
      --openflamingo_precision amp_bf16 --peak_dtype bfloat16 --peak_size 8192
  python -m flamingo_jax.train --config configs/bench_3b.py --workdir /tmp/b3 --compile_only

The paper's Flamingo-3B LM (Chinchilla-style: 24 layers, d 2048, 16 heads x 128,
GELU FFW 8192, LayerNorm, rotary, tied 32,000-row embeddings; frozen) with a
GATED XATTN-DENSE block before every LM block and a 6-layer Perceiver
Resampler with 64 latents, on precomputed NFNet-F6 features (320 px -> 10 x 10
positions x 3072 channels, so 100 x 3072 per image); 5 images and 256 tokens
per example. The resampler and cross-attention have OpenFlamingo's shapes
(resampler at the feature width 3072, 8 heads x 64, FFW 4x GELU; cross-attention
8 heads x 64, FFW 4x GELU, no key/value LayerNorm) so that benchmarks/train_step.py
runs the very same workload in OpenFlamingo's modules: 1.27B frozen and 1.42B
trainable parameters (Flamingo-3B trains 1.4B).

bfloat16 compute, frozen weights stored in bfloat16, trainable weights and
Adam state in float32. Where the model has them (issue 13 items 1-2), scanned
layers and the fused attention kernel are switched on.

Arguments (comma-separated): `fp32` computes and stores everything in
float32; `tiny` shrinks the LM (2 layers of width 64), the features (8 x 32)
and the batch (2 x 32 tokens) so the GPU suite's code paths run on a CPU in seconds.
The batch is `synthetic.datasets.interleaved.batch_size` (override it with
--config.synthetic.datasets.interleaved.batch_size=N); BATCH is the largest
multiple of 8 that fits one H200 (141 GB) with room to spare by the compiled
memory analysis (32 would fill it to the last GiB), see docs/benchmarks.md.
"""
import dataclasses
import os

from flamingo_jax.config import load_config, to_config_dict
from flamingo_jax.models.config import FlamingoConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset

VOCAB = 32000
BATCH = 24  # examples of 256 tokens: 6,144 tokens per step (108 GiB by the memory analysis)


def get_config(arg=None):
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - {"fp32", "tiny"}
  if unknown:
    raise ValueError(f"configs/bench_3b.py: unknown argument(s) {sorted(unknown)}; "
                     "expected a comma-separated subset of fp32, tiny")
  tiny, fp32 = "tiny" in args, "fp32" in args
  features = 32 if tiny else 3072
  model = FlamingoConfig(
      vision=VisionConfig(name="none"),
      vision_feature_dim=features,
      # Depth 6, 64 latents, 8 heads x 64 even when tiny: OpenFlamingo's Flamingo fixes them.
      resampler=ResamplerConfig(depth=6, width=features, num_heads=8, head_dim=64,
                                num_latents=64,
                                ffw_mult=4, activation="gelu", input_proj=False,
                                temporal_embeddings=False),
      xattn=XAttnConfig(every=1, placement="openflamingo", num_heads=8,
                        head_dim=64, ffw_mult=4, activation="gelu",
                        kv_layernorm=False, query_layernorm=True, ffw_layernorm=True,
                        no_image="zero_attention"),
      lm=lm_preset("chinchilla", vocab_size=512 if tiny else VOCAB,
                   num_layers=2 if tiny else 24, width=64 if tiny else 2048,
                   num_heads=4 if tiny else 16, head_dim=16 if tiny else 128,
                   max_length=2048),
      image_token_id=(512 if tiny else VOCAB) - 2,
      eoc_token_id=(512 if tiny else VOCAB) - 1,
      # As OpenFlamingo with a frozen LM: no trainable <image>/<EOC> rows.
      train_new_token_embeddings=False,
      dtype="float32" if fp32 else "bfloat16",
  )
  fields = {f.name for f in dataclasses.fields(FlamingoConfig)}
  if "scan_layers" in fields:  # issue 13 item 1
    model = dataclasses.replace(model, scan_layers=True)
  if "attention" in fields:  # issue 13 item 2: cuDNN flash attention on GPUs
    model = dataclasses.replace(model, attention="auto")
  # The train, optim, mesh and checkpoint sections of the small benchmark (bench.py).
  config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"),
                       None if fp32 else "bf16")
  config.model = to_config_dict(model)
  config.train.total_steps = 20
  config.synthetic = dict(
      seed=0, num_classes=8, nan_batches=(), feature_positions=8 if tiny else 100,
      datasets=dict(interleaved=dict(kind="interleaved", batch_size=2 if tiny else BATCH,
                                     seq_len=32 if tiny else 256, max_images=2 if tiny else 5,
                                     num_frames=1, weight=1.0)))
  return config
