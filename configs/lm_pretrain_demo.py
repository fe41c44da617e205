"""The demo's text-only LM pretraining (stage `lm` of `make demo`, flamingo_jax/lm_pretrain.py).

  python -m flamingo_jax.lm_pretrain --config configs/lm_pretrain_demo.py:demo_workdir \
      --workdir demo_workdir/lm

The argument is the demo's work directory: its data/corpus.txt (the synthetic
shapes world's text) and data/tokenizer/ (trained on it by the data stage)
are read; the LM (configs/demo.py's lm_config: Chinchilla-style, 3 layers,
d 128) is what the Flamingo stage then loads frozen from lm/export/lm.
Rows of 256 tokens (many corpus lines each): 8-shot prompts are ~150-250
tokens long, and a rotary LM trained on shorter rows degrades past them.
"""
import importlib.util
import os

import ml_collections

from flamingo_jax.config import to_config_dict


def _demo():
  """configs/demo.py beside this file (the LM's sizes and the demo's paths)."""
  spec = importlib.util.spec_from_file_location(
      "_flamingo_demo_config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(workdir="demo_workdir"):
  demo = _demo()
  p = demo.paths(workdir)
  config = ml_collections.ConfigDict()
  config.model = to_config_dict(demo.lm_config(demo.tokens(workdir)["vocab_size"]))
  config.train = dict(total_steps=120, seed=0, log_every=50, max_consecutive_nonfinite=10,
                      batch_size=16)
  config.corpus = dict(paths=[f"{p['data']}/corpus.txt"], tokenizer=p["tokenizer"],
                       seq_len=256, val_fraction=0.02)
  # AdamW, linear warm-up, cosine decay to a tenth of the peak, global-norm clip 1.
  config.optim = dict(learning_rate=3e-3, warmup_steps=20, schedule="cosine",
                      end_learning_rate=3e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                      clip_norm=1.0)
  config.mesh = dict(slice=1, data=-1, fsdp=1, tensor=1, zero1=False)
  config.checkpoint = dict(every=100, keep=2, async_save=True, enabled=True)
  return config
