"""Text-only LM pretraining: data rows, exact resume, export that Flamingo's `lm` loads."""
import dataclasses
import os

import jax
import ml_collections
import numpy as np
import pytest

from flamingo_jax.trainers.lm import corpus
from flamingo_jax.trainers.lm import train as lm_pretrain
from flamingo_jax.trainers.flamingo.components import restore_component
from flamingo_jax.config import apply_overrides, to_config_dict
from flamingo_jax.models.config import FlamingoConfig, lm_preset
from flamingo_jax.model_dir import init_params


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
  from flamingo_jax.data import shapes
  from flamingo_jax.data.train_tokenizer import train_tokenizer
  out = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  lines = [shapes.caption(shapes.sample_scene(rng)) for _ in range(1500)]
  (out / "corpus.txt").write_text("\n".join(lines) + "\n")
  tok = train_tokenizer([str(out / "corpus.txt")], 64, str(out / "tok"), model_type="bpe")
  return lines, tok


def small(tok, **lm_overrides):
  lm = lm_preset("chinchilla", **{**dict(vocab_size=tok.info.vocab_size, num_layers=1, width=32,
                                         num_heads=2, head_dim=16, max_length=64),
                                  **lm_overrides})
  config = ml_collections.ConfigDict({
      "model": to_config_dict(lm),
      "train": {"total_steps": 6, "batch_size": 8, "log_every": 3},
      "corpus": {"seq_len": 16},
      "optim": {"warmup_steps": 2, "learning_rate": 1e-2, "end_learning_rate": 1e-3},
      "checkpoint": {"every": 3}})
  return lm, config


def test_rows_and_batches(corpus_and_tokenizer):
  lines, tok = corpus_and_tokenizer
  rows = corpus.token_rows(lines, tok, 16)
  assert rows.shape[1] == 17 and rows.dtype == np.int32
  assert rows[0, 0] == tok.info.bos_id
  train, val = corpus.split_rows(rows, 0.1, 0)
  assert len(train) + len(val) == len(rows) and len(val) == round(0.1 * len(rows))
  a = corpus.batch_at(train, 5, 8, 0)
  np.testing.assert_array_equal(a, corpus.batch_at(train, 5, 8, 0))
  assert not np.array_equal(a, corpus.batch_at(train, 6, 8, 0))
  with pytest.raises(ValueError, match="fewer than two rows"):
    corpus.token_rows(lines[:1], tok, 16)
  _, config = small(tok)
  with pytest.raises(ValueError, match=r"'train\.batch_size' must be a positive int"):
    lm_pretrain.setup(apply_overrides(config, ["train.batch_size=0"]))


def test_resume_is_exact_and_export_loads_into_flamingo(corpus_and_tokenizer, tmp_path):
  lines, tok = corpus_and_tokenizer
  lm, c = small(tok)
  straight = lm_pretrain.run(c, str(tmp_path / "a"), lines=lines, tokenizer=tok)
  lm_pretrain.run(c, str(tmp_path / "b"), stop_at=3, lines=lines, tokenizer=tok)
  resumed = lm_pretrain.run(c, str(tmp_path / "b"), lines=lines, tokenizer=tok)
  losses = [r["loss"] for r in straight["history"]]
  assert [r["loss"] for r in resumed["history"]] == losses
  assert len(losses) == c.train.total_steps and losses[-1] < losses[0]
  assert np.isfinite(straight["val_loss"])

  config = FlamingoConfig(lm=lm, image_token_id=tok.info.image_token_id,
                          eoc_token_id=tok.info.eoc_token_id)
  config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, name="none"),
                               vision_feature_dim=16)
  abstract = init_params(config, abstract=True)["lm"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  restored = restore_component(straight["export"], "lm", abstract)
  assert os.path.isdir(straight["export"])
  assert jax.tree.structure(restored) == jax.tree.structure(abstract)


def test_vocab_too_small_is_an_error(corpus_and_tokenizer, tmp_path):
  lines, tok = corpus_and_tokenizer
  _, c = small(tok, vocab_size=8)
  with pytest.raises(ValueError, match="smaller than the tokenizer"):
    lm_pretrain.run(c, str(tmp_path), lines=lines, tokenizer=tok)
