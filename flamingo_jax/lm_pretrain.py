"""Text-only pretraining of the decoder LM that Flamingo later freezes.

  python -m flamingo_jax.lm_pretrain --corpus corpus.txt --tokenizer tok.model \
      --workdir DIR [--steps 300] [--config.lm.width=128 ...]

Flamingo starts from a pretrained LM (Chinchilla in the paper); the demo
trains a tiny one first, on the text of its synthetic world. The corpus
(one document a line) is tokenised as <BOS> ids <EOS>, concatenated and cut
into rows of seq_len + 1 tokens; 2% of the rows are held out for a
validation loss. Batch k of an epoch is a fixed function of (seed, step), so
resuming from a checkpoint replays exactly the batches an uninterrupted run
would have seen. At the end the LM is exported as a parameter checkpoint
(`DIR/export/lm`, the tree Flamingo's `lm` component holds) that a
Flamingo config loads with `model_init.lm`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.config import LMConfig, from_config_dict, lm_preset, to_config_dict
from flamingo_jax.models.lm import DecoderLM

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Optimisation of the text-only run (AdamW, warm-up then cosine decay)."""
  steps: int = 300
  batch_size: int = 32
  seq_len: int = 64
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  seed: int = 0
  checkpoint_every: int = 100
  log_every: int = 25
  val_fraction: float = 0.02

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "log_every"):
      if getattr(self, name) <= 0:
        raise ValueError(f"lm_pretrain: {name} must be > 0, got {getattr(self, name)}")
    if not 0.0 <= self.val_fraction < 0.5:
      raise ValueError(f"lm_pretrain: val_fraction must be in [0, 0.5), got "
                       f"{self.val_fraction}")


def token_rows(lines: Sequence[str], tokenizer, seq_len: int) -> np.ndarray:
  """Lines -> <BOS> ids <EOS> concatenated, cut into rows [N, seq_len + 1] int32."""
  info = tokenizer.info
  stream: list[int] = []
  for line in lines:
    line = line.strip()
    if line:
      stream.extend([info.bos_id, *tokenizer.encode(line), info.eos_id])
  n = len(stream) // (seq_len + 1)
  if n < 2:
    raise ValueError(f"lm_pretrain: the corpus has {len(stream)} tokens, fewer than two rows "
                     f"of seq_len + 1 = {seq_len + 1}; use a longer corpus or a shorter seq_len")
  return np.asarray(stream[:n * (seq_len + 1)], np.int32).reshape(n, seq_len + 1)


def split_rows(rows: np.ndarray, val_fraction: float, seed: int):
  """(train rows, val rows): a seeded permutation, the first val_fraction held out."""
  order = np.random.default_rng(seed).permutation(len(rows))
  n_val = int(round(len(rows) * val_fraction))
  return rows[order[n_val:]], rows[order[:n_val]]


def batch_at(rows: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Batch `step` [B, L + 1]: epoch e is a permutation seeded by (seed, e)."""
  per_epoch = max(len(rows) // batch_size, 1)
  epoch, k = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(len(rows))
  idx = order[(k * batch_size + np.arange(batch_size)) % len(rows)]
  return rows[idx]


def next_token_loss(logits, targets):
  """Mean NLL of targets [B, L] under logits [B, L, V]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def make_optimizer(c: PretrainConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, c.warmup_steps,
                                                max(c.steps, c.warmup_steps + 1),
                                                c.learning_rate * 0.1)
  # No decay on norms and biases (1-D leaves), as is usual for LMs.
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
  return optax.chain(optax.clip_by_global_norm(c.clip_norm),
                     optax.adamw(schedule, weight_decay=c.weight_decay, mask=decay_mask))


def pretrain(lm: LMConfig, c: PretrainConfig, corpus: Sequence[str], tokenizer, workdir: str,
             *, on_step: Optional[Callable[[int, dict], None]] = None,
             stop_at: Optional[int] = None) -> dict:
  """Trains `lm` on the corpus lines, resuming from workdir's checkpoints; exports
  workdir/export/lm when done. Returns {'step', 'history', 'val_loss', 'export'}.

  on_step(step, metrics): called after every step (progress bars).
  stop_at: stop after this step with a checkpoint, as a preemption would.
  """
  if lm.vocab_size < tokenizer.info.vocab_size:
    raise ValueError(f"lm_pretrain: lm.vocab_size {lm.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary {tokenizer.info.vocab_size}")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  rows = token_rows(corpus, tokenizer, c.seq_len)
  train_rows, val_rows = split_rows(rows, c.val_fraction, c.seed)
  model = DecoderLM(lm)
  tx = make_optimizer(c)

  def init(rng):
    params = nn.unbox(model.init(rng, jnp.zeros((1, c.seq_len), jnp.int32))["params"])
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  @jax.jit
  def train_step(state, batch):
    def loss_fn(params):
      return next_token_loss(model.apply({"params": params}, batch[:, :-1]), batch[:, 1:])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
             "step": state["step"] + 1},
            {"loss": loss, "grad_norm": optax.global_norm(grads)})

  @jax.jit
  def eval_loss(params, batch):
    return next_token_loss(model.apply({"params": params}, batch[:, :-1]), batch[:, 1:])

  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1,
                                           enable_async_checkpointing=False))
  abstract = jax.eval_shape(init, jax.random.key(c.seed))
  latest = manager.latest_step()
  if latest is not None:
    state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    log.info("lm_pretrain: resumed from step %d", latest)
  else:
    state = jax.jit(init)(jax.random.key(c.seed))
  history_path = os.path.join(workdir, "history.jsonl")
  history = _read_history(history_path, int(state["step"]))
  end = c.steps if stop_at is None else min(stop_at, c.steps)
  t0 = time.perf_counter()
  with open(history_path, "a") as hist:
    for step in range(int(state["step"]), end):
      state, metrics = train_step(state, batch_at(train_rows, step, c.batch_size, c.seed))
      row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
      history.append(row)
      hist.write(json.dumps(row) + "\n")
      if on_step:
        on_step(step + 1, row)
      if (step + 1) % c.log_every == 0:
        log.info("lm_pretrain step %d/%d loss %.4f (%.1f s)", step + 1, c.steps, row["loss"],
                 time.perf_counter() - t0)
      if (step + 1) % c.checkpoint_every == 0 or step + 1 == end:
        hist.flush()
        manager.save(step + 1, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  out = {"step": int(state["step"]), "history": history}
  if int(state["step"]) < c.steps:
    return out
  val = [float(eval_loss(state["params"], val_rows[i:i + c.batch_size]))
         for i in range(0, len(val_rows) - c.batch_size + 1, c.batch_size)]
  out["val_loss"] = float(np.mean(val)) if val else float("nan")
  export = os.path.join(workdir, "export", "lm")
  ckpt_lib.save_params(export, state["params"], {
      "component": "lm", "step": int(state["step"]), "val_loss": out["val_loss"],
      "lm_config": to_config_dict(lm).to_dict(), "source": "flamingo_jax.lm_pretrain"})
  out["export"] = export
  return out


def _read_history(path: str, upto: int) -> list[dict]:
  """The logged steps <= upto (a crash may have logged steps past the checkpoint)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if r["step"] <= upto]
  with open(path, "w") as f:  # drop the steps that will be replayed
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
  from flamingo_jax.config import apply_overrides, split_config_args
  from flamingo_jax.data.tokenizer import Tokenizer
  import ml_collections
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = split_config_args(argv)
  p = argparse.ArgumentParser(prog="python -m flamingo_jax.lm_pretrain",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--corpus", required=True, nargs="+", help="text files, a document a line")
  p.add_argument("--tokenizer", required=True, help="sentencepiece model")
  p.add_argument("--workdir", required=True)
  p.add_argument("--family", default="chinchilla", help="LM family preset (config.py)")
  args = p.parse_args(rest)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  tokenizer = Tokenizer.load(args.tokenizer)
  lm = lm_preset(args.family, vocab_size=tokenizer.info.vocab_size, num_layers=2, width=128,
                 num_heads=4, head_dim=32, max_length=256)
  cfg = ml_collections.ConfigDict({"lm": to_config_dict(lm),
                                   "pretrain": dataclasses.asdict(PretrainConfig())})
  cfg = apply_overrides(cfg, overrides)
  lm = from_config_dict(LMConfig, cfg.lm, prefix="lm")
  c = from_config_dict(PretrainConfig, cfg.pretrain, prefix="pretrain")
  corpus = []
  for path in args.corpus:
    with open(path) as f:
      corpus.extend(f.read().splitlines())
  out = pretrain(lm, c, corpus, tokenizer, args.workdir)
  print(json.dumps({k: v for k, v in out.items() if k != "history"}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
