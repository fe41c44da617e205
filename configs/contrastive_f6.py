"""Flamingo's vision pretraining (paper appendix B.1.3): NFNet-F6 + BERT-base, contrastive.

  python -m flamingo_jax.contrastive --workdir gs://bucket/contrastive_f6 --config \
      configs/contrastive_f6.py:align=$ALIGN,ltip=$LTIP,tokenizer=$TOKENIZER
  python -m flamingo_jax.contrastive --config configs/contrastive_f6.py --workdir /tmp/f6 \
      --compile_only --fake_devices=8 --config.data.datasets.align.batch_size=8 \
      --config.data.datasets.ltip.batch_size=8

Config argument: comma-separated key=value; keys align, ltip (glob patterns
of ArrayRecord shards written by `python -m flamingo_jax.data.convert --kind
pairs`, e.g. ALIGN=/data/align/*.array_record) and tokenizer (the
sentencepiece model of the Flamingo LM).

From the paper: NFNet-F6 at 288 px, both towers mean-pooled and projected to
1376 dims, two-term contrastive loss with label smoothing 0.1 and a
trainable temperature, batch 16,384, Adam at 1e-3 decayed linearly to 0,
AGC 0.01 on the NFNet, global-norm clipping 10 on the text tower, ALIGN and
LTIP combined by gradient accumulation.
Our choices where the paper is silent (docs/contrastive.md):
  * text tower: BERT-base sizes (12 layers, width 768, 12 heads of 64, FFW
    3072, ~110M parameters with the 32,002-row embedding), pre-LayerNorm,
    captions of up to 64 tokens in the Flamingo LM's tokenisation;
  * batch: 16,384 pairs *per dataset* (the contrastive batch that sets the
    negatives of each loss term), so an update sees 32,768 pairs;
  * no warm-up (none stated; `--config.optim.warmup_steps=5000` adds one);
  * total_steps 500,000 (not in our reference notes; change freely);
  * bfloat16 compute, float32 parameters and optimizer state, remat of every
    NFNet and text block.
The exported tower (`workdir/export/vision`) is the `vision` subtree of any
Flamingo config with `vision.name = "nfnet"`, `nfnet.variant = "F6"`
(configs/flamingo_{3,9,80}b.py); it runs there at 320 px.
"""
import ml_collections

from flamingo_jax.config import to_config_dict
from flamingo_jax.models.config import NFNetConfig, VisionConfig
from flamingo_jax.models.dual_encoder import DualEncoderConfig
from flamingo_jax.models.text_encoder import TextEncoderConfig

SEQ_LEN = 64
# CLIP's seven-template ImageNet ensemble (Radford et al. 2021, prompt notebook).
IMAGENET_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                      "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                      "a photo of the small {}.")


def _parse(arg):
  out = {"align": "/data/align/*.array_record", "ltip": "/data/ltip/*.array_record",
         "tokenizer": "/data/tokenizer.model"}
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} must be key=value (keys: {sorted(out)})")
    key, value = item.split("=", 1)
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(out)}")
    out[key] = value
  return out


def get_config(arg=None):
  a = _parse(arg)
  model = DualEncoderConfig(
      vision=VisionConfig(name="nfnet", image_size=288, nfnet=NFNetConfig(variant="F6",
                                                                          remat=True)),
      text=TextEncoderConfig(vocab_size=32002, width=768, num_layers=12, num_heads=12,
                             head_dim=64, ffw_mult=4, activation="gelu", max_length=SEQ_LEN,
                             norm="pre", remat=True),
      embed_dim=1376, init_inverse_temperature=1 / 0.07, max_inverse_temperature=100.0,
      dtype="bfloat16", param_dtype="float32")
  config = ml_collections.ConfigDict({"model": to_config_dict(model)})
  # The optimiser, mesh and the rest at their defaults (the loader fills them); towers
  # from parameter checkpoints with e.g. --config.model_init.vision=/ckpt/nfnet_f6_imagenet.
  config.train = dict(total_steps=500_000, log_every=100)
  config.checkpoint = dict(every=2000)
  pairs = dict(kind="pairs", source="arrayrecord", batch_size=16384, seq_len=SEQ_LEN,
               weight=1.0)
  config.data = dict(
      datasets=dict(align=dict(pairs, paths=[a["align"]]), ltip=dict(pairs, paths=[a["ltip"]])),
      tokenizer=a["tokenizer"],
      image=dict(size=288, flip=True, colour_jitter=0.2),
      seed=0, worker_count=8, read_threads=16)
  # Held-out evaluation; empty paths skip a part. E.g.
  #   --config.eval.retrieval.paths="['/data/coco_karpathy_test/*.tar']"
  #   --config.eval.classification.examples=/data/imagenet/val.json (+ class_names, image_root)
  config.eval = dict(
      every=10_000, batch_size=1024, recall_at=(1, 5, 10),
      retrieval=dict(paths=[], seq_len=SEQ_LEN, max_examples=5000),
      classification=dict(templates=IMAGENET_TEMPLATES, seq_len=SEQ_LEN))
  return config
