"""The demo's Flamingo (`make demo`, flamingo_jax/demo.py) and the base of configs/ablations/.

  python -m flamingo_jax.demo --workdir demo_workdir          # runs every stage
  python -m flamingo_jax.train --config configs/demo.py:demo_workdir --workdir DIR

The argument is the demo's work directory. Its data/ (the synthetic shapes
world, flamingo_jax/data/synthetic.py), lm/ (the tiny LM pretrained on the
text corpus, flamingo_jax/lm_pretrain.py) and vision/ (the tiny NFNet
pretrained contrastively, flamingo_jax/contrastive.py) are loaded frozen;
the resampler and gated cross-attention train on the weighted mixture of
interleaved documents, image-text pairs, VQA pairs and videos. The
vocabulary and the <image>/<EOC> ids come from data/manifest.json (the
tokenizer trained there), so the model always agrees with its tokenizer.

Paper recipe at miniature scale: Chinchilla-style LM (3 layers, d 128),
NFNet (4 stages, 64 px, 2x2 feature grid of width 256), Perceiver Resampler
(depth 2, 16 latents), GATED XATTN-DENSE before every LM block, AdamW with
linear warm-up, weight decay except the resampler, global-norm clipping 1,
one batch of every dataset per update, gradients accumulated with weights.
Where the demo departs from the paper, for a CPU budget of minutes: the
dataset weights (documents 1.0, captions 1.0, VQA 0.5, video 0.1; the
paper's 1.0 / 0.2 / 0.2 / 0.03 make the image-reading signal of the pairs
too weak to learn in ~1,000 small steps), a learning rate of 1e-3 and
p_next 0 for the documents (the paper's 0.5 suits web pages, where text
may come before its image; here it never does).
"""
import json
import os

import ml_collections

from flamingo_jax.config import to_config_dict
from flamingo_jax.models.config import FlamingoConfig, NFNetConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset

IMAGE_SIZE = 64
# Used before the tokenizer exists (count_params, config tests): the synthetic
# tokenizer's upper bound of 512 pieces plus <image> and <EOC>.
DEFAULT_TOKENS = {"vocab_size": 514, "image_token_id": 512, "eoc_token_id": 513}


def vision_config() -> VisionConfig:
  """The tiny NFNet (also what configs/contrastive_tiny.py:vision=nfnet trains)."""
  return VisionConfig(name="nfnet", image_size=IMAGE_SIZE, nfnet=NFNetConfig(
      variant="F0", depths=(1, 1, 1, 1), widths=(32, 64, 128, 128), stem_widths=(8, 16, 16, 32),
      group_width=16, stochastic_depth_rate=0.0))


def lm_config(vocab_size: int):
  return lm_preset("chinchilla", vocab_size=vocab_size, num_layers=3, width=128, num_heads=4,
                   head_dim=32, max_length=256)


def paths(workdir: str) -> dict:
  """Where each stage of the demo writes (flamingo_jax/demo.py)."""
  w = os.path.abspath(workdir)
  return {"root": w, "data": f"{w}/data", "tokenizer": f"{w}/data/tokenizer/tokenizer.model",
          "lm": f"{w}/lm", "lm_export": f"{w}/lm/export/lm", "vision": f"{w}/vision",
          "vision_export": f"{w}/vision/export/vision", "flamingo": f"{w}/flamingo",
          "eval": f"{w}/eval", "model": f"{w}/model"}


def tokens(workdir: str) -> dict:
  manifest = os.path.join(paths(workdir)["data"], "manifest.json")
  if not os.path.exists(manifest):
    return dict(DEFAULT_TOKENS)
  with open(manifest) as f:
    info = json.load(f)["tokenizer"]
  if info is None:
    raise ValueError(f"{manifest} records no tokenizer: rerun the demo's data stage")
  return {k: info[k] for k in ("vocab_size", "image_token_id", "eoc_token_id")}


def eval_section(data: str, tokenizer: str) -> dict:
  """The held-out (val) split as three tasks in the benchmark file formats."""
  images = f"{data}/images"
  return {
      "tokenizer": tokenizer, "batch_size": 16, "prompt_buckets": (64, 128, 256),
      "decode_method": "greedy", "seed": 0,
      "tasks": {
          # Templates in the words of the training data (the paper's "Output:"
          # never occurs in this tiny world's text).
          "captions": {"kind": "captioning", "train": f"{data}/captions/dataset_shapes.json",
                       "train_splits": ("train",), "test_splits": ("val",),
                       "image_root": images, "max_new_tokens": 24,
                       "template": "{caption}"},
          "vqa": {"kind": "vqa", "train": f"{data}/vqa/train_questions.json",
                  "train_annotations": f"{data}/vqa/train_annotations.json",
                  "test": f"{data}/vqa/val_questions.json",
                  "test_annotations": f"{data}/vqa/val_annotations.json",
                  "image_root": images, "image_naming": "{data_subtype}/{image_id}.png",
                  "max_new_tokens": 4},
          "classes": {"kind": "classification", "format": "list",
                      "train": f"{data}/classification/train.json",
                      "test": f"{data}/classification/val.json",
                      "class_names": f"{data}/classification/classes.json",
                      "image_root": images, "template": "a {class_name}"},
      }}


def get_config(workdir="demo_workdir"):
  p = paths(workdir)
  t = tokens(workdir)
  model = FlamingoConfig(
      vision=vision_config(),
      resampler=ResamplerConfig(depth=2, width=128, num_heads=4, head_dim=32, num_latents=16,
                                max_frames=8),
      xattn=XAttnConfig(every=1, num_heads=4, head_dim=32),
      lm=lm_config(t["vocab_size"]),
      image_token_id=t["image_token_id"],
      eoc_token_id=t["eoc_token_id"],
      dtype="float32",
  )
  config = ml_collections.ConfigDict({"model": to_config_dict(model)})
  # The other keys of train, optim, mesh, checkpoint and distributed at their defaults (the
  # trainer fills them). seed, mixing and export_dir stay: the demo's seeds, the round-robin
  # ablation and the Flamingo stage override them on this file as written.
  config.train = dict(total_steps=300, seed=0, input="pipeline", mixing="accumulate",
                      frozen_dtype="float32", log_every=25, export_dir="")
  config.optim = dict(learning_rate=1e-3, warmup_steps=30)
  config.checkpoint = dict(every=100, keep=2)
  config.model_init = {"lm": p["lm_export"], "vision": p["vision_export"]}
  d = p["data"]

  def dataset(kind, sub, **kw):
    return dict(kind=kind, source="tar", paths=[f"{d}/{sub}/train-*.tar"], **kw)

  config.data = dict(
      tokenizer=p["tokenizer"],
      image=dict(size=IMAGE_SIZE, flip=False, colour_jitter=0.0),
      seed=0, worker_count=0, read_threads=2,
      datasets=dict(
          # 160 tokens and 9 images: a whole 8-picture gallery (an 8-shot prompt
          # and its query is ~135 tokens) fits one training window. p_next 0 (the
          # paper: 0.5): in this world every text follows the picture it is about,
          # so next-image mode pairs it with the wrong picture and teaches the
          # model to read a picture from the segment before, which in a few-shot
          # prompt is the previous demonstration (docs/demo.md: captioning fell
          # with shots because of it).
          interleaved=dataset("interleaved", "interleaved", seq_len=160, max_images=9,
                              p_next=0.0, batch_size=4, weight=1.0),
          pairs=dataset("pairs", "pairs", seq_len=32, batch_size=16, weight=1.0),
          vqa=dataset("pairs", "vqa", seq_len=32, batch_size=8, weight=0.5),
          video=dataset("video", "video", seq_len=32, num_frames=4, fps=0.5, batch_size=2,
                        weight=0.1),
      ))
  config.eval = eval_section(d, p["tokenizer"])
  return config
