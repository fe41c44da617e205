"""Tiny contrastive pretraining on the synthetic shapes world: minutes on a CPU.

  python -m flamingo_jax.data.synthetic --out /tmp/synth
  python -m flamingo_jax.contrastive --config configs/contrastive_tiny.py:data=/tmp/synth \
      --workdir /tmp/contrastive_tiny
  python -m flamingo_jax.contrastive --config configs/contrastive_tiny.py:data=/tmp/synth \
      --workdir /tmp/contrastive_tiny --eval_only

Config argument: comma-separated key=value, e.g. `:data=/tmp/synth,vision=nfnet`.
  data    the directory `flamingo_jax.data.synthetic` wrote (default /tmp/synth)
  vision  patch (default): configs/tiny.py's patch encoder at 32 px, so the
          exported tower loads into configs/tiny.py as `model_init.vision`;
          nfnet: a 4-block NFNet at 64 px (AGC then clips real conv kernels)

The train split's two pair shards play ALIGN and LTIP: one batch of each per
update, gradients summed. Left/right flips are off because the captions say
"on the left" / "on the right".
"""
import ml_collections

from flamingo_jax.config import to_config_dict
from flamingo_jax.models.config import NFNetConfig, PatchEncoderConfig, VisionConfig
from flamingo_jax.models.dual_encoder import DualEncoderConfig
from flamingo_jax.models.text_encoder import TextEncoderConfig

SEQ_LEN = 32


def _parse(arg):
  out = {"data": "/tmp/synth", "vision": "patch"}
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} must be key=value (keys: {sorted(out)})")
    key, value = item.split("=", 1)
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(out)}")
    out[key] = value
  if out["vision"] not in ("patch", "nfnet"):
    raise ValueError(f"config argument vision={out['vision']!r}; expected patch or nfnet")
  return out


def vision_config(kind: str) -> VisionConfig:
  if kind == "patch":  # configs/tiny.py's encoder
    return VisionConfig(name="patch", image_size=32,
                        patch=PatchEncoderConfig(patch_size=8, width=32, depth=1))
  return VisionConfig(name="nfnet", image_size=64, nfnet=NFNetConfig(
      variant="F0", depths=(1, 1, 1, 1), widths=(32, 64, 128, 128), stem_widths=(8, 16, 16, 32),
      group_width=16, stochastic_depth_rate=0.0))


def get_config(arg=None):
  a = _parse(arg)
  d = a["data"]
  vision = vision_config(a["vision"])
  model = DualEncoderConfig(
      vision=vision,
      # The synthetic tokenizer has <= 512 pieces plus <image>, <EOC>.
      text=TextEncoderConfig(vocab_size=514, width=64, num_layers=2, num_heads=4, head_dim=16,
                             max_length=SEQ_LEN, norm="pre"),
      embed_dim=64)
  config = ml_collections.ConfigDict({"model": to_config_dict(model)})
  # Every other key at its default (the loader fills them); e.g. a converted ImageNet
  # NFNet tower: --config.model_init.vision=/ckpt/nfnet_f0.
  config.train = dict(total_steps=300, log_every=25)
  config.optim = dict(learning_rate=3e-3, warmup_steps=10)
  config.checkpoint = dict(every=100, keep=2)
  pairs = dict(kind="pairs", source="tar", batch_size=32, seq_len=SEQ_LEN, weight=1.0)
  config.data = dict(
      datasets=dict(align=dict(pairs, paths=[f"{d}/pairs/train-00000.tar"]),
                    ltip=dict(pairs, paths=[f"{d}/pairs/train-00001.tar"])),
      tokenizer=f"{d}/tokenizer/tokenizer.model",
      image=dict(size=vision.image_size, flip=False, colour_jitter=0.1),
      seed=0, worker_count=0, read_threads=2)
  config.eval = dict(
      recall_at=(1, 5, 10),
      retrieval=dict(paths=[f"{d}/pairs/val-*.tar"]),
      classification=dict(
          examples=f"{d}/classification/val.json",
          class_names=f"{d}/classification/classes.json", image_root=f"{d}/images",
          templates=("a {} on the left", "a {} in the middle", "a {} on the right")))
  return config
