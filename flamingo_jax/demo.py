"""`make demo`: the main job on the embedded default.

Today: builds the tiny Flamingo (configs/tiny.py), checks that at
initialisation it computes exactly its frozen LM, then trains the resampler,
the gated cross-attention and the new token rows for a few AdamW steps on a
small batch of random images whose captions name the image (so the loss can
only fall if the model reads the images), and prints the loss per step.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flamingo_jax.config import model_config
from flamingo_jax.config_file import load_config
from flamingo_jax.models import labels as labels_lib
from flamingo_jax.models.flamingo import Flamingo, merged_lm_params
from flamingo_jax.models.lm import DecoderLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_batch(config, batch=8, num_classes=4, seed=0):
  """Images of one of `num_classes` random patterns; the caption is the class id.

  tokens: <BOS> <image> class_token <EOC>; the loss is on predicting the class
  token after <image> (and <EOC> after it).
  """
  rng = np.random.default_rng(seed)
  size = config.vision.image_size
  patterns = rng.normal(size=(num_classes, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, num_classes, batch)
  images = patterns[labels] + 0.1 * rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  bos, class0 = 1, 10
  tokens = np.stack([[bos, config.image_token_id, class0 + y, config.eoc_token_id]
                     for y in labels]).astype(np.int32)
  targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], 1)
  loss_mask = np.zeros_like(tokens, np.float32)
  loss_mask[:, 1:3] = 1.0  # predict class token, then <EOC>
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask,
              images=images[:, None, None])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="demo_workdir")
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.py"))
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)

  config = model_config(load_config(args.config))
  model = Flamingo(config)
  batch = jax.tree.map(jnp.asarray, make_batch(config))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["tokens"],
                                        images=batch["images"])["params"])
  labels = labels_lib.param_labels(params, config)
  trainable, frozen = labels_lib.partition(params, labels)
  print(f"tiny Flamingo: {sum(x.size for x in trainable.values()):,} trainable, "
        f"{sum(x.size for x in frozen.values()):,} frozen parameters")

  logits, _ = jax.jit(model.apply)({"params": params}, batch["tokens"], images=batch["images"])
  lm_logits = jax.jit(DecoderLM(config.lm).apply)(
      {"params": merged_lm_params(params, config)}, batch["tokens"])
  init_gap = float(jnp.abs(logits - lm_logits).max())
  print(f"at init (gates 0) max |Flamingo - frozen LM| logits = {init_gap:.2e}")

  def loss_fn(tr):
    logits, _ = model.apply({"params": labels_lib.merge(tr, frozen)}, batch["tokens"],
                            images=batch["images"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * batch["loss_mask"]) / jnp.maximum(batch["loss_mask"].sum(), 1.0)

  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=0.1))
  opt_state = optimizer.init(trainable)

  @jax.jit
  def step(tr, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(tr)
    updates, opt_state = optimizer.update(grads, opt_state, tr)
    return optax.apply_updates(tr, updates), opt_state, loss

  history = []
  start = time.time()
  for i in range(args.steps):
    trainable, opt_state, loss = step(trainable, opt_state)
    history.append(float(loss))
    if i % 10 == 0 or i == args.steps - 1:
      print(f"step {i:3d}  loss {float(loss):.4f}")
  print(f"{args.steps} steps in {time.time() - start:.1f}s; loss {history[0]:.3f} -> "
        f"{history[-1]:.3f} (chance: {np.log(config.lm.vocab_size):.3f})")
  with open(os.path.join(args.workdir, "demo_losses.json"), "w") as f:
    json.dump({"init_gap": init_gap, "losses": history}, f)


if __name__ == "__main__":
  main()
