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
  config.train = dict(total_steps=120, log_every=50, batch_size=16)
  config.corpus = dict(paths=[f"{p['data']}/corpus.txt"], tokenizer=p["tokenizer"],
                       seq_len=256)
  # The optimiser at the LM trainer's defaults: AdamW, linear warm-up, cosine decay to a
  # tenth of the peak, global-norm clip 1.
  config.checkpoint = dict(every=100, keep=2)
  return config
