"""Analytic FLOPs: the formulas pinned by hand, NFNet against the paper, and the
frozen-aware multipliers (3x trainable, 2x frozen above a trainable part, 1x below)."""
import dataclasses

import pytest

from flamingo_jax.trainers.flamingo import flops
from flamingo_jax.models.config import FlamingoConfig, LMConfig, ResamplerConfig, XAttnConfig, paper_model


def test_matmul_and_block_formulas():
  assert flops.dense(2, 3, 4) == 48
  lm = LMConfig(width=8, num_heads=2, head_dim=4, ffw_mult=4, activation="gelu")
  # q,k,v,o: 4 * 2*16*8*8; attention (causal half): 2 * 2*16*4*16*2 / 2; FFW 2 * 2*16*8*32
  assert flops.lm_block(lm, 16) == 4 * 2048 + 4096 + 16384
  gated = dataclasses.replace(lm, activation="swiglu", ffw_dim=12, num_kv_heads=1)
  assert flops.lm_block(gated, 16) == (2048 + 2 * 1024 + 2048) + 4096 + 3 * 2 * 16 * 8 * 12
  x = XAttnConfig(num_heads=2, head_dim=4, ffw_mult=4)
  # q 2*16*8*8, k/v 2 * 2*10*6*8, attention 2 * 2*16*4*10*2, out 2*16*8*8, FFW 2 * 2*16*8*32
  assert flops.xattn_block(x, 8, 6, 16, 10) == 2048 + 1920 + 5120 + 2048 + 16384
  assert flops.xattn_block(dataclasses.replace(x, kind="vanilla"), 8, 6, 16, 10) == (
      2048 + 1920 + 5120 + 2048)
  r = ResamplerConfig(depth=1, width=8, num_heads=2, head_dim=4, num_latents=4, ffw_mult=4,
                      input_proj=True)
  # input proj 2*10*6*8; q 2*4*8*8; k/v 2 * 2*14*8*8; attention 2 * 2*4*4*14*2;
  # out 2*4*8*8; FFW 2 * 2*4*8*32
  assert flops.resampler(r, 6, 10) == 960 + 512 + 3584 + 1792 + 512 + 4096


def test_nfnet_f6_matches_the_paper():
  """Paper: NFNet-F6 is 116.6 GMAC at 320 px and 94.4 GMAC at 288 px."""
  config = paper_model("3b")
  assert flops.nfnet(config, 320) / 2 == pytest.approx(116.6e9, rel=1e-3)
  assert flops.nfnet(config, 288) / 2 == pytest.approx(94.4e9, rel=1e-3)


def _small(**kw) -> FlamingoConfig:
  base = dict(
      resampler=ResamplerConfig(depth=1, width=16, num_heads=2, head_dim=8, num_latents=4),
      xattn=XAttnConfig(every=2, placement="openflamingo", num_heads=2, head_dim=8),
      lm=LMConfig(vocab_size=64, num_layers=4, width=16, num_heads=2, head_dim=8),
      vision_feature_dim=12, image_token_id=62, eoc_token_id=63)
  base.update(kw)
  return FlamingoConfig(**base)


def test_frozen_aware_multipliers():
  shape = flops.BatchShape(batch_size=2, seq_len=8, num_images=3, feature_positions=5)
  # Without trainable new-token rows, gradients start at the first xattn (before block 1).
  c = _small(train_new_token_embeddings=False)
  fwd = dict(flops.forward_by_component(c, shape))
  f = flops.step_flops(c, [shape], num_params=1000)
  expect = (3 * fwd["resampler"] + 3 * (fwd["xattn/1"] + fwd["xattn/3"]) + 1 * fwd["lm/0"]
            + 2 * (fwd["lm/1"] + fwd["lm/2"] + fwd["lm/3"] + fwd["lm/head"]))
  assert f["frozen_aware"] == expect
  assert f["all_3x"] == 3 * sum(fwd.values()) == 3 * f["forward"]
  assert f["6n"] == 6 * 1000 * 16 and f["text_tokens"] == 16
  # Trainable <image>/<EOC> input rows: gradients cross every LM block.
  c2 = _small()
  fwd2 = dict(flops.forward_by_component(c2, shape))
  assert flops.step_flops(c2, [shape])["frozen_aware"] == expect + fwd2["lm/0"] + (
      2 * (fwd2["lm/head"] - fwd["lm/head"]))
  # An unfrozen LM trains everything: 3x.
  c3 = _small(frozen=("vision",))
  assert flops.step_flops(c3, [shape])["frozen_aware"] == flops.step_flops(c3, [shape])["all_3x"]


def test_frozen_vision_counts_once_and_datasets_add():
  c = paper_model("3b")
  pairs = flops.BatchShape(batch_size=4, seq_len=32, num_images=1, image_size=320)
  docs = flops.BatchShape(batch_size=2, seq_len=256, num_images=5, image_size=320)
  f = flops.step_flops(c, [pairs, docs])
  assert f["by_component"]["vision"] == (4 + 10) * flops.nfnet(c, 320)
  assert f["frozen_aware"] == (flops.step_flops(c, [pairs])["frozen_aware"]
                               + flops.step_flops(c, [docs])["frozen_aware"])
  assert f["text_tokens"] == 4 * 32 + 2 * 256
