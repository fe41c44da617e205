"""An OpenFlamingo model built locally with small random weights and saved the way
the released ones are (tests/fixtures/make_openflamingo_fixture.py) gives the same
logits through our converter, for text with several images."""
import os

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

from flamingo_jax.convert.openflamingo import (convert_openflamingo,  # noqa: E402
                                               load_torch_state_dict)
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "openflamingo_tiny")


def load(every=2):
  from safetensors.numpy import load_file
  checkpoint = load_torch_state_dict(os.path.join(FIXTURE, "checkpoint.pt"))
  vision = load_file(os.path.join(FIXTURE, "vision.safetensors"))
  return convert_openflamingo(checkpoint, os.path.join(FIXTURE, "lm"), vision,
                              cross_attn_every_n_layers=every, media_token_id=101,
                              eoc_token_id=100, vision_heads=4)


def test_logits_match_openflamingo():
  config, params = load()
  io = np.load(os.path.join(FIXTURE, "io.npz"))
  images = io["vision_x"].transpose(0, 1, 2, 4, 5, 3)  # [b, T, F, C, H, W] -> NHWC
  logits, _ = jax.jit(Flamingo(config).apply)({"params": params}, io["lang_x"], images=images,
                                              attention_mask=io["attention_mask"])
  assert config.xattn.placement == "openflamingo" and len(
      [k for k in params if k.startswith("xattn_block_")]) == 2
  assert np.abs(np.asarray(logits) - io["logits"]).max() < 1e-4


def test_wrong_interval_is_named():
  with pytest.raises(ValueError, match=r"cross-attention layer 0 is missing .* "
                     r"cross_attn_every_n_layers=1"):
    load(every=1)


def test_cli_writes_a_loadable_checkpoint(tmp_path):
  import flax.linen as nn
  import orbax.checkpoint as ocp

  from flamingo_jax.config import model_config
  from flamingo_jax.config import load_config
  from flamingo_jax.convert.__main__ import main
  from flamingo_jax.tools.count_params import abstract_params

  # The fixture's tiny ViT has 4 heads of 8; real OpenCLIP towers use heads of 64, which is
  # what the CLI assumes. Convert the real way and check the tree and config it writes.
  out = tmp_path / "of"
  rc = main(["openflamingo", "--checkpoint", os.path.join(FIXTURE, "checkpoint.pt"),
             "--lm", os.path.join(FIXTURE, "lm"),
             "--vision", os.path.join(FIXTURE, "vision.safetensors"),
             "--cross_attn_every_n_layers", "2", "--media_token_id", "101",
             "--eoc_token_id", "100", "--out", str(out)])
  assert rc == 0
  config = model_config(load_config(os.path.join(os.path.dirname(FIXTURE), "..", "..",
                                                 "configs", "from_checkpoint.py"), str(out)))
  assert config.xattn.placement == "openflamingo" and config.lm.vocab_size == 103
  abstract = abstract_params(config)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(str(out / "params"))
  assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(restored)
  assert rc == 0 and main(["openflamingo", "--checkpoint", os.path.join(FIXTURE, "checkpoint.pt"),
                           "--lm", os.path.join(FIXTURE, "lm"), "--vision",
                           os.path.join(FIXTURE, "vision.safetensors"),
                           "--cross_attn_every_n_layers", "3", "--media_token_id", "101",
                           "--eoc_token_id", "100", "--out", str(tmp_path / "bad")]) == 2
