"""A Flamingo around a converted Hugging Face LM: the LM frozen, its own tokenizer, the
vocabulary grown by `<image>` / `<EOC>`.

  python -m flamingo_jax.convert hf-lm --input path/to/Llama-3.1-8B --out lm
  python -m flamingo_jax.train --config configs/from_hf_lm.py:lm --workdir /tmp/run

The argument: DIR, what `convert hf-lm --out DIR` wrote (DIR/model_config.json,
DIR/params, the LM's tokenizer files), then comma-separated options: `tiny` (a
small vision encoder, resampler and cross-attention and small synthetic batches:
a CPU smoke run). `model_init.lm` is DIR/params (`--config.model_init.lm=OTHER/params`
for other weights of the same shape); `model_init.vision` is empty
(`--config.model_init.vision=NFNET_DIR`, from `convert nfnet`).

Vocabulary: `<image>` and `<EOC>` take the LM tokenizer's ids when it has them,
else the next ids after its largest (data/tokenizer.py); with no tokenizer in DIR,
the two ids after the LM's embedding rows. Ids past the LM's rows get no LM row
(`model.lm.embedding_rows`): their trainable rows are `new_token_*`, so DIR loads
as converted. The model trains on the synthetic data of flamingo_jax/data/in_memory.py;
for real data set `data.datasets` and `train.input = "pipeline"` in a config that
calls this one (`data.tokenizer` is already DIR's), see docs/checkpoints.md.
"""
import dataclasses
import json
import os

import ml_collections

from flamingo_jax.config import from_config_dict, to_config_dict
from flamingo_jax.models.config import FlamingoConfig, LMConfig, PatchEncoderConfig, ResamplerConfig, VisionConfig, XAttnConfig, paper_model
from flamingo_jax.errors import ConfigError

OPTIONS = ("tiny",)


def new_token_ids(directory: str, rows: int):
  """(<image> id, <EOC> id, tokenizer path or "") for an LM with `rows` embedding rows."""
  from flamingo_jax.data.tokenizer import Tokenizer
  for name in ("tokenizer.json", "tokenizer.model"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      info = Tokenizer.load(directory if name == "tokenizer.json" else path).info
      if info.vocab_size > rows + 2:
        raise ConfigError(f"{path}: the tokenizer has {info.vocab_size} ids, more than the "
                          f"LM's {rows} embedding rows plus <image> and <EOC>")
      return info.image_token_id, info.eoc_token_id, path
  return rows, rows + 1, ""


def get_config(arg=None):
  if not arg:
    raise ConfigError("configs/from_hf_lm.py needs the converted LM directory: "
                      "--config configs/from_hf_lm.py:DIR")
  directory, *options = arg.split(",")
  for o in options:
    if o not in OPTIONS:
      raise ConfigError(f"configs/from_hf_lm.py: unknown option {o!r}; expected {OPTIONS}")
  path = os.path.join(directory, "model_config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{path!r} does not exist: run python -m flamingo_jax.convert hf-lm "
                      f"--input HF_DIR --out {directory} first")
  with open(path) as f:
    lm_json = json.load(f).get("lm")
  if lm_json is None:
    raise ConfigError(f"{path}: no 'lm' section (not written by convert hf-lm)")
  lm = from_config_dict(LMConfig, lm_json, "model.lm")
  rows = lm.embedding_rows or lm.vocab_size
  image, eoc, tokenizer = new_token_ids(directory, rows)
  vocab = max(rows, image + 1, eoc + 1)
  lm = dataclasses.replace(lm, vocab_size=vocab, embedding_rows=rows if vocab > rows else 0)

  tiny = "tiny" in options
  if tiny:
    vision = VisionConfig(name="patch", image_size=32,
                          patch=PatchEncoderConfig(patch_size=8, width=32, depth=1))
    feature_dim = 32
    resampler = ResamplerConfig(depth=1, width=32, num_heads=2, head_dim=16, num_latents=4,
                                max_frames=1)
    xattn = XAttnConfig(every=1, num_heads=2, head_dim=16)
  else:  # the paper's vision side (NFNet-F6 at 320 px, resampler 6 x 1536)
    paper = paper_model("3b")
    vision, feature_dim, resampler = paper.vision, paper.vision_feature_dim, paper.resampler
    xattn = XAttnConfig(every=4 if lm.num_layers >= 8 else 1, placement="paper",
                        num_heads=lm.num_heads, head_dim=lm.head_dim,
                        activation="squared_relu")
  model = FlamingoConfig(vision=vision, vision_feature_dim=feature_dim, resampler=resampler,
                         xattn=xattn, lm=lm, image_token_id=image, eoc_token_id=eoc,
                         dtype="float32" if tiny else "bfloat16")

  config = ml_collections.ConfigDict({"model": to_config_dict(model)})
  config.model_init = {"lm": os.path.join(directory, "params")}
  config.data = {"tokenizer": tokenizer, "datasets": {}}
  batch = 2 if tiny else 8
  config.train = dict(total_steps=20 if tiny else 10_000, input="synthetic", log_every=1)
  config.optim = dict(learning_rate=1e-4, warmup_steps=2 if tiny else 1000)
  config.synthetic = dict(datasets=dict(
      interleaved=dict(kind="interleaved", batch_size=batch, seq_len=32 if tiny else 256,
                       max_images=2, num_frames=1, weight=1.0),
      pairs=dict(kind="pairs", batch_size=batch, seq_len=16 if tiny else 32, max_images=1,
                 num_frames=1, weight=0.2)))
  return config
