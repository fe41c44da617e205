"""Contrastive pretraining of the vision tower: loss, temperature, pooling, per-tower
clipping, a tiny end-to-end run with resume and evaluation, and the exported
vision tower loading into Flamingo."""
import contextlib
import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flamingo_jax.runtime import params_io
from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.trainers.contrastive import train as contrastive
from flamingo_jax.trainers.contrastive import evaluate as contrastive_eval
from flamingo_jax.training import optim
from flamingo_jax.runtime import sharding
from flamingo_jax.training.agc import unitwise_norm
from flamingo_jax.config import to_config_dict
from flamingo_jax.models.config import PatchEncoderConfig, VisionConfig, model_config
from flamingo_jax.models.dual_encoder import (DualEncoder, DualEncoderConfig, clip_temperature,
                                              contrastive_loss)
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.models.labels import param_labels
from flamingo_jax.models.text_encoder import TextEncoder, TextEncoderConfig, masked_mean
from flamingo_jax.models.vision import build_vision_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = VisionConfig(name="patch", image_size=32,
                     patch=PatchEncoderConfig(patch_size=8, width=32, depth=1))
TEXT = TextEncoderConfig(vocab_size=64, width=32, num_layers=1, num_heads=2, head_dim=16,
                         max_length=12)


@pytest.fixture(scope="module")
def patch_model():
  """A tiny dual encoder, its params, a batch of 5 and the jitted apply (compiled once)."""
  config = DualEncoderConfig(vision=PATCH, text=TEXT, embed_dim=8)
  model = DualEncoder(config)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(5, 32, 32, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, TEXT.vocab_size, (5, 12)), jnp.int32)
  mask = jnp.asarray(np.arange(12)[None] < np.array([12, 2, 5, 9, 3])[:, None])
  # Random values on the init's shapes: no init to compile.
  shapes = jax.eval_shape(lambda *a: nn.unbox(model.init(jax.random.key(0), *a)["params"]),
                          images, tokens, mask)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.2, x.dtype), shapes)
  params["log_inverse_temperature"] = jnp.float32(math.log(1 / 0.07))
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  return dict(model=model, params=params, inputs=(images, tokens, mask), apply=apply)


# --------------------------------------------------------------------------
# Loss, temperature, pooling


def _numpy_loss(img, txt, beta, smoothing):
  logits = beta * img.astype(np.float64) @ txt.astype(np.float64).T
  b = len(logits)
  targets = (1 - smoothing) * np.eye(b) + smoothing / b

  def ce(z):
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return -(targets * logp).sum(1).mean()

  return ce(logits) + ce(logits.T)


def test_loss_matches_numpy_with_label_smoothing(patch_model):
  logits, aux = patch_model["apply"](patch_model["params"], *patch_model["inputs"])
  img, txt = np.asarray(aux["image_embeddings"]), np.asarray(aux["text_embeddings"])
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, rtol=1e-5)
  beta = float(aux["inverse_temperature"])
  assert beta == pytest.approx(1 / 0.07, rel=1e-5)
  for smoothing in (0.1, 0.0):
    loss, metrics = contrastive_loss(logits, smoothing)
    assert float(loss) == pytest.approx(_numpy_loss(img, txt, beta, smoothing), rel=1e-5)
    assert float(metrics["loss_image_to_text"] + metrics["loss_text_to_image"]) == \
        pytest.approx(float(loss), rel=1e-6)
  # Sharper logits on the diagonal: lower loss, perfect in-batch accuracy.
  loss, metrics = contrastive_loss(20.0 * jnp.eye(5), 0.1)
  assert float(metrics["accuracy_image_to_text"]) == 1.0
  assert float(loss) < float(contrastive_loss(jnp.zeros((5, 5)), 0.1)[0])
  with pytest.raises(ValueError, match="square"):
    contrastive_loss(jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match="label_smoothing"):
    contrastive_loss(jnp.zeros((4, 4)), 1.0)


def test_temperature_is_clipped_at_100(patch_model):
  params = dict(patch_model["params"], log_inverse_temperature=jnp.float32(math.log(500.0)))
  logits, aux = patch_model["apply"](params, *patch_model["inputs"])
  assert float(aux["inverse_temperature"]) == pytest.approx(100.0)
  np.testing.assert_allclose(
      logits, 100.0 * aux["image_embeddings"] @ aux["text_embeddings"].T, rtol=1e-5)
  # The trainer's projection after each update: the parameter itself is capped.
  clipped = clip_temperature(params, 100.0)
  assert float(clipped["log_inverse_temperature"]) == pytest.approx(math.log(100.0))
  assert float(clip_temperature(dict(params, log_inverse_temperature=jnp.float32(1.0)),
                                100.0)["log_inverse_temperature"]) == 1.0
  with pytest.raises(ValueError, match="init_inverse_temperature"):
    contrastive.model_config(DualEncoderConfig(vision=PATCH, text=TEXT,
                                               init_inverse_temperature=200.0))


def test_masked_mean_pooling_ignores_padding(patch_model):
  x = jnp.asarray([[[1.0, 2.0], [3.0, 4.0], [np.nan, 1e9]],
                   [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]],
                   [[7.0, 7.0], [7.0, 7.0], [7.0, 7.0]]])
  mask = jnp.asarray([[True, True, False], [True, False, False], [False, False, False]])
  np.testing.assert_allclose(masked_mean(x, mask), [[2.0, 3.0], [5.0, 6.0], [0.0, 0.0]])
  # A text's embedding does not depend on what sits in its padding.
  params, (images, tokens, mask) = patch_model["params"], patch_model["inputs"]
  embed = lambda p, t, m: patch_model["apply"](p, images, t, m)[1]["text_embeddings"]  # noqa
  other = jnp.where(mask, tokens, (tokens + 7) % TEXT.vocab_size)
  np.testing.assert_allclose(embed(params, tokens, mask), embed(params, other, mask), atol=1e-6)
  assert not np.allclose(embed(params, tokens, mask), embed(params, other, mask | True),
                         atol=1e-4)
  with pytest.raises(ValueError, match="max_length"):
    jax.eval_shape(TextEncoder(TEXT).init, jax.random.key(0), jnp.zeros((1, 13), jnp.int32),
                   jnp.ones((1, 13), bool))


# --------------------------------------------------------------------------
# Per-tower clipping


def test_per_tower_clipping_agc_on_vision_global_norm_on_text():
  """With a huge Adam eps the first update is -lr * g_clipped / eps, so the
  clipped gradient of every leaf can be read off the update. The tree has the
  dual encoder's top-level keys and NFNet-like leaves (conv kernels, gains,
  SkipInit scalars) so the optimizer's per-tower labels are what is tested."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  params = {
      "vision": {"stem_conv0": {"kernel": normal(3, 3, 3, 8), "gain": normal(8),
                                "bias": jnp.zeros(8)},
                 "block_0": {"conv1": {"kernel": normal(3, 3, 4, 8)},
                             "se": {"fc0": {"kernel": normal(8, 4)}},
                             "skip_gain": jnp.float32(0.0)}},
      "vision_projection": {"kernel": normal(8, 6)},
      "text": {"token_embedding": normal(10, 4), "block_0": {"ffw": {"up": {
          "kernel": normal(4, 16), "bias": normal(16)}}}},
      "text_projection": {"kernel": normal(4, 6)},
      "log_inverse_temperature": jnp.float32(2.0),
  }
  eps, lr = 1e8, 1.0
  tx = contrastive.make_optimizer(
      contrastive.TowerOptimConfig(learning_rate=lr, eps=eps, vision_agc=0.01, text_clip_norm=10.0),
      total_steps=100)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 100, jnp.float32),
                       params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  seen = jax.tree.map(lambda u: -np.asarray(u, np.float64) * eps / lr, updates)

  # Vision tower: every unit at most 0.01 * max(||W_i||, 1e-3); these random
  # gradients are far above it, so each unit sits exactly at the bound (the
  # zero bias and SkipInit gain at 0.01 * 1e-3).
  flat_p = traverse_util.flatten_dict(params["vision"], sep="/")
  flat_g = traverse_util.flatten_dict(seen["vision"], sep="/")
  for name, p in flat_p.items():
    bound = 0.01 * np.maximum(np.asarray(unitwise_norm(p)), 1e-3)
    got = np.asarray(unitwise_norm(jnp.asarray(flat_g[name], jnp.float32)))
    np.testing.assert_allclose(got * np.ones_like(bound), bound, rtol=1e-3, err_msg=name)
  # The vision projection (the final linear layer) and the temperature: unclipped.
  np.testing.assert_allclose(seen["vision_projection"]["kernel"],
                             grads["vision_projection"]["kernel"], rtol=1e-3)
  np.testing.assert_allclose(seen["log_inverse_temperature"], grads["log_inverse_temperature"],
                             rtol=1e-3)
  # Text tower: scaled as a whole to global norm 10, directions kept.
  text_in = [grads["text"], grads["text_projection"]]
  text_out = [seen["text"], seen["text_projection"]]
  norm_in = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(text_in))))
  norm_out = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(text_out))))
  assert norm_in > 10 and norm_out == pytest.approx(10.0, rel=1e-3)
  for a, b in zip(jax.tree.leaves(text_in), jax.tree.leaves(text_out)):
    np.testing.assert_allclose(b, np.asarray(a) * 10.0 / norm_in, rtol=1e-3, atol=1e-9)


def test_retrieval_and_zero_shot_metrics_by_hand():
  sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.0, 0.2, 0.3]])
  r = contrastive_eval.retrieval_recall(sim, np.eye(3, dtype=bool), ks=(1, 2))
  # images: 0 ranks its text 1st, 1 ranks it 2nd, 2 1st; texts: 0 1st, 1 1st, 2 1st.
  assert r == {"image_to_text/R1": 2 / 3, "image_to_text/R2": 1.0,
               "text_to_image/R1": 1.0, "text_to_image/R2": 1.0}
  # Texts 0 and 1 are the same caption: either counts for images 0 and 1.
  tokens = np.array([[5, 6, 0], [5, 6, 9], [7, 0, 0]])
  mask = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0]], bool)
  pos = contrastive_eval.caption_positives(tokens, mask)
  assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
  assert contrastive_eval.retrieval_recall(sim, pos, ks=(1,))["image_to_text/R1"] == 1.0
  acc = contrastive_eval.zero_shot_accuracy(np.eye(3)[[0, 1, 2, 2]], np.eye(3),
                                            np.array([0, 2, 2, 1]), ks=(1, 2, 5))
  assert acc == {"top1": 0.5, "top2": 1.0}


def test_config_errors_name_the_key(tmp_path):
  from flamingo_jax.trainers.contrastive.train import load
  spec = os.path.join(REPO, "configs", "contrastive_tiny.py") + f":data={tmp_path}"
  for override, key in [("model.embed_dim=0", "model.embed_dim"),
                        ("model.text.norm='mid'", "model.text.norm"),
                        ("model.vision.name='nope'", "model.vision.name"),
                        ("model.text.max_length=8", "data.datasets.align.seq_len"),
                        ("data.datasets.align.kind='video'", "data.datasets.align.kind"),
                        ("data.image.size=64", "data.image.size"),
                        ("optim.vision_agc=-1.0", "optim.vision_agc"),
                        ("train.label_smoothing=1.0", "train.label_smoothing")]:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
      contrastive.setup(load(spec, [override]))
  with pytest.raises(ValueError, match="model_init.lm"):
    contrastive.setup(load(spec, ["--config.model_init={'lm': '/x'}"]))
  with pytest.raises(ValueError, match="templates"):
    contrastive_eval.eval_config({"classification": {"examples": "x", "class_names": "y",
                                                     "templates": ["no slot"]}})
  with pytest.raises(ValueError, match="unknown config argument"):
    load(os.path.join(REPO, "configs", "contrastive_tiny.py") + ":size=3")


# --------------------------------------------------------------------------
# End to end: train (with a stop and a resume), evaluate, export, load into Flamingo


@contextlib.contextmanager
def _compilation_cache(directory):
  """JAX's persistent compilation cache, on for the block: the resumed run and
  the checkpoint evaluation compile exactly what the first run did."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  cc.set_cache_dir(directory)
  cc.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    cc.reset_cache()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """configs/contrastive_tiny.py (one text layer) on a small synthetic world:
  15 steps, a stop, a resume to 40, evaluation, export, on one device."""
  from flamingo_jax.data import synthetic
  root = tmp_path_factory.mktemp("contrastive")
  data = str(root / "synth")
  synthetic.write_synthetic(
      data, seed=0, image_size=32, arrayrecord=False,
      sizes=synthetic.Sizes(pairs=(512, 96), documents=(1, 1), videos=(1, 1), video_frames=2,
                            corpus_lines=3000, samples_per_shard=256))
  config = contrastive.load(
      os.path.join(REPO, "configs", "contrastive_tiny.py") + f":data={data}",
      ["--config.train.total_steps=40", "--config.train.log_every=10",
       "--config.checkpoint.every=0", "--config.model.text.num_layers=1",
       "--config.eval.batch_size=96"])
  workdir = str(root / "run")
  devices = jax.devices()[:1]
  with _compilation_cache(str(root / "xla_cache")):
    first = contrastive.run(config, workdir, stop_at=15, devices=devices)
    second = contrastive.run(config, workdir, devices=devices)
    again = contrastive.evaluate_checkpoint(config, workdir, devices=devices)
  return {"config": config, "workdir": workdir, "first": first, "second": second,
          "again": again}


def test_tiny_config_trains_resumes_and_reports_retrieval(tiny_run):
  first, second = tiny_run["first"], tiny_run["second"]
  assert (first["stopped"], first["step"], first["export"]) == ("stop_at", 15, None)
  assert (second["stopped"], second["step"]) == ("done", 40)
  losses = [h["loss"] for h in first["history"] + second["history"]]
  assert len(losses) == 40
  # Two datasets, each 2 * log(32) ~ 6.9 at chance: the sum starts near 14.
  assert 12.5 < np.mean(losses[:5]) < 15.5
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
  assert all(h["inverse_temperature"] <= 100.0 for h in second["history"])
  ev = second["eval"]
  for k in (1, 5, 10):
    for direction in ("image_to_text", "text_to_image"):
      assert 0.0 <= ev[f"retrieval/{direction}/R{k}"] <= 1.0
  assert ev["retrieval/pairs"] == 96 and ev["zero_shot/classes"] == 15
  # Better than chance after 40 steps (chance R@10 ~ 10/96 plus duplicates).
  assert ev["retrieval/image_to_text/R10"] > 0.2
  # The evaluation CLI's restore path gives the same numbers from the checkpoint.
  again = tiny_run["again"]
  assert again["step"] == 40
  assert again["retrieval/image_to_text/R5"] == pytest.approx(ev["retrieval/image_to_text/R5"])


def test_exported_vision_tower_loads_into_flamingo(tiny_run):
  flamingo_config = model_config(contrastive.load(os.path.join(REPO, "configs", "tiny.py")))
  assert flamingo_config.vision == PATCH == contrastive.model_config(tiny_run["config"]).vision
  model = Flamingo(flamingo_config)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
      images=jnp.zeros((1, 1, 1, 32, 32, 3))))["params"])
  _, frozen = optim.split_params(shapes, param_labels(shapes, flamingo_config))
  target = optim.cast_tree(frozen["vision"], jnp.bfloat16)  # as train.py stores it
  mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
  target = sharding.with_shardings(
      target, jax.tree.map(lambda _: sharding.replicated(mesh), target))
  export = os.path.join(tiny_run["workdir"], "export", "vision")
  loaded = params_io.restore_params(export, target, "vision")
  assert jax.tree.structure(loaded) == jax.tree.structure(shapes["vision"])
  assert jax.tree.map(lambda x: x.shape, loaded) == \
      jax.tree.map(lambda x: x.shape, shapes["vision"])
  # The same weights as the trained dual encoder's, and the same features.
  with ckpt_lib.ocp.StandardCheckpointer() as ckptr:
    exported = ckptr.restore(export)
  params = dict(jax.tree.map(jnp.asarray, exported))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 1, 32, 32, 3)), jnp.float32)
  flamingo_features = model.apply(
      {"params": {**jax.tree.map(jnp.zeros_like, shapes), "vision": params}}, images,
      method=Flamingo.encode_images)
  encoder = build_vision_encoder(contrastive.model_config(tiny_run["config"]).vision)
  grid = encoder.apply({"params": params}, images[:, 0, 0])
  np.testing.assert_allclose(flamingo_features[:, 0, 0], grid.reshape(2, -1, grid.shape[-1]),
                             rtol=1e-6)


def test_nfnet_vision_subtree_matches_flamingo():
  """The tiny NFNet variant: same tree as Flamingo's `vision` for that vision config."""
  tiny = contrastive.load(os.path.join(REPO, "configs", "contrastive_tiny.py") + ":vision=nfnet")
  vision = contrastive.model_config(tiny).vision
  dual = jax.eval_shape(lambda: DualEncoder(DualEncoderConfig(vision=vision, text=TEXT)).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 4), jnp.int32),
      jnp.ones((1, 4), bool)))["params"]["vision"]
  base = model_config(contrastive.load(os.path.join(REPO, "configs", "tiny.py")))
  flamingo = Flamingo(dataclasses.replace(base, vision=vision, vision_feature_dim=256))
  ref = jax.eval_shape(lambda: flamingo.init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
      images=jnp.zeros((1, 1, 1, 64, 64, 3))))["params"]["vision"]
  shape = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(t))  # noqa: E731
  assert shape(dual) == shape(ref)
  assert to_config_dict(vision).nfnet.depths == (1, 1, 1, 1)
