"""Text-only pretraining of the decoder LM that Flamingo later freezes.

  python -m flamingo_jax.lm_pretrain --config configs/lm_pretrain_demo.py:demo_workdir \
      --workdir demo_workdir/lm [--config.train.total_steps=300 ...]

Flamingo starts from a pretrained LM (Chinchilla in the paper); the demo
trains a tiny one first, on the text of its synthetic world (corpus.py: the
rows of the corpus, batch k a fixed function of (seed, k), so a resumed run
replays exactly the batches an uninterrupted run would have seen). The loss is
objective.token_nll; the step, mesh and shardings, checkpoints (with SIGTERM),
non-finite skip and metrics (with every step's history.jsonl) are the training
library's (flamingo_jax/training/). At the end the LM is exported as a parameter
checkpoint (`WORKDIR/export/lm`, the tree Flamingo's `lm` component holds) that
a Flamingo config loads with `model_init.lm`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flamingo_jax.config import check, from_config_dict, to_config_dict
from flamingo_jax.errors import DataError, run_cli
from flamingo_jax.models.config import LMConfig
from flamingo_jax.models.labels import TRAINABLE, TRAINABLE_NO_DECAY
from flamingo_jax.models.lm import DecoderLM
from flamingo_jax.runtime import distributed, params_io, sharding
from flamingo_jax.trainers.lm.corpus import (CorpusConfig, RowBatches, corpus_config,
                                             corpus_rows, lm_batch, load_tokenizer)
from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.training import cli, objective, optim
from flamingo_jax.training import state as state_lib
from flamingo_jax.training.loop import (LoopConfig, StepHandler, batch_shardings,
                                        check_batch_sizes, prepare_workdir, process_rows,
                                        put_batch, run_loop)
from flamingo_jax.training.metrics import MetricsWriter

log = logging.getLogger("flamingo_jax.trainers.lm.train")


# --------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class TrainConfig(LoopConfig):
  """`train` section."""
  total_steps: int = 300
  log_every: int = 25
  batch_size: int = 32  # rows per update, global over all processes


@dataclasses.dataclass(frozen=True)
class LMOptimConfig(optim.OptimConfig):
  """`optim` section: AdamW, warm-up then cosine decay to end_learning_rate; no weight
  decay on norms and biases (1-D leaves), as is usual for LMs."""
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  schedule: str = "cosine"
  end_learning_rate: float = 3e-4


# This trainer's sections beside cli.RUN_SECTIONS (defaults filled before overrides).
SECTIONS = {"train": TrainConfig, "corpus": CorpusConfig, "optim": LMOptimConfig}


@dataclasses.dataclass(frozen=True)
class Setup(cli.RunSetup):
  """Every section, validated once."""
  model: LMConfig
  train: TrainConfig
  corpus: CorpusConfig
  optim: LMOptimConfig


def with_default_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The sections and keys a config leaves out, with their defaults (before overrides)."""
  return cli.with_default_sections(config, SECTIONS)


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Parses and checks every section once; errors name the key."""
  check("model" in config, "config has no 'model' section (the LMConfig to train)")
  model = from_config_dict(LMConfig, config.model, "model")
  train = cli.train_section(config, TrainConfig)
  check(train.batch_size > 0, "config key 'train.batch_size' must be a positive int, got "
        f"{train.batch_size}")
  corpus = corpus_config(cli.section(config, "corpus"))
  check(corpus.seq_len <= model.max_length or model.positions != "learned",
        f"config key 'corpus.seq_len' ({corpus.seq_len}) exceeds model.max_length "
        f"({model.max_length}) of learned positions")
  return Setup(model=model, train=train, corpus=corpus,
               optim=optim.optim_config(cli.section(config, "optim"), LMOptimConfig),
               **cli.run_sections(config))


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/X.py[:arg]`, defaults filled, then `--config.a.b=v` overrides: run's input."""
  return cli.load(spec, overrides, with_default_sections)


# --------------------------------------------------------------------------
# Model, optimizer, step


def decay_labels(params: Any) -> Any:
  """Weight decay on matrices, none on norms and biases (1-D leaves); nothing frozen."""
  return jax.tree.map(lambda x: TRAINABLE if x.ndim > 1 else TRAINABLE_NO_DECAY, params)


def make_optimizer(c: LMOptimConfig, total_steps: int) -> optax.GradientTransformation:
  return optim.make_optimizer(c, total_steps, decay_labels)


def make_grad_fn(model: DecoderLM) -> Callable:
  """-> grad_fn(params, frozen, batches, rng) -> (grads, metrics): mean token NLL."""

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["tokens"])
    nll, count = objective.token_nll(logits, batch["targets"], batch["loss_mask"])
    return nll / jnp.maximum(count, 1.0)

  def grad_fn(params, frozen, batches, rng):
    del frozen, rng
    loss, grads = jax.value_and_grad(loss_fn)(params, batches["text"])
    return grads, {"loss": loss}

  return grad_fn


# --------------------------------------------------------------------------
# The run


def run(config: ml_collections.ConfigDict, workdir: str, *, compile_only: bool = False,
        stop_at: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None,
        on_step: Optional[Callable[[int, dict], None]] = None,
        lines: Optional[Sequence[str]] = None, tokenizer: Any = None) -> dict:
  """Trains the LM of `config` (as `load` returns it), resuming from workdir's checkpoints;
  exports workdir/export/lm when done. lines / tokenizer: the corpus and tokenizer in
  memory instead of corpus.paths / corpus.tokenizer.
  Returns {'step', 'stopped', 'history', 'memory', 'val_loss', 'export'}.
  """
  # ------------------------------------------------------------------ Config, data, workdir
  s = setup(config)
  distributed.initialize(s.distributed)
  tokenizer = load_tokenizer(s.corpus) if tokenizer is None else tokenizer
  if s.model.vocab_size < tokenizer.info.vocab_size:
    raise DataError(f"lm_pretrain: model.vocab_size {s.model.vocab_size} is smaller than the "
                    f"tokenizer's vocabulary {tokenizer.info.vocab_size} "
                    f"({s.corpus.tokenizer or 'the tokenizer given'})")
  train_rows, val_rows = corpus_rows(s.corpus, tokenizer, s.train.seed, lines)
  workdir = prepare_workdir(workdir, config)
  total_steps = s.train.total_steps

  # ------------------------------------------------------------------ Mesh, model, layout
  mesh = sharding.make_mesh(s.mesh, devices)
  model = DecoderLM(s.model)
  schedule = optim.learning_rate_schedule(s.optim, total_steps)
  tx = make_optimizer(s.optim, total_steps)
  tokens = jnp.zeros((1, s.corpus.seq_len), jnp.int32)
  init = lambda r: model.init(r, tokens)["params"]  # noqa: E731
  boxed = state_lib.boxed_params(init, mesh)
  ts = state_lib.train_state(nn.unbox(boxed), sharding.param_specs(boxed, mesh, s.mesh), tx,
                             mesh, s.mesh)

  # ------------------------------------------------------------------ Compile the update step
  b, length = s.train.batch_size, s.corpus.seq_len
  check_batch_sizes({"text": b}, mesh, "train.batch_size")
  sds = jax.ShapeDtypeStruct
  batch_abs = {"tokens": sds((b, length), jnp.int32), "targets": sds((b, length), jnp.int32),
               "loss_mask": sds((b, length), jnp.float32)}
  batch_sh = batch_shardings(mesh, batch_abs)
  step_fn = objective.make_train_step(make_grad_fn(model), tx, schedule, ts.grad_shardings)
  compiled = state_lib.compile_step(
      step_fn, mesh, s.mesh.rules, (ts.shardings, {}, {"text": batch_sh}),
      (ts.shardings, sharding.replicated(mesh)),
      (ts.target(), {}, {"text": sharding.with_shardings(batch_abs, batch_sh)}),
      fit_check=compile_only)
  memory = state_lib.memory_report(compiled, {
      "params": (ts.abstract["params"], ts.shardings["params"]),
      "optimizer_state": (ts.abstract["opt_state"], ts.shardings["opt_state"])})
  summary = {"step": None, "stopped": None, "history": [], "memory": memory}
  if compile_only:
    return summary

  # ------------------------------------------------------------------ Initialise or restore
  local = process_rows(mesh, b)
  iterators = {"text": RowBatches(train_rows, b, s.train.seed, local)}
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), s.checkpoint)
  state = (state_lib.restore_latest(checkpointer, ts.target(), iterators)
           if s.checkpoint.enabled else None)
  if state is None:
    state = state_lib.fresh_state(lambda r: nn.unbox(init(r)), tx, s.train.seed, mesh,
                                  s.mesh.rules, ts.shardings)

  # ------------------------------------------------------------------ Loop
  step = int(jax.device_get(state["step"]))
  # history.jsonl: every step's metrics (plots, exact-resume checks), the resumed run's too
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0, history_from=step)

  def train_step(state, step):
    batch = put_batch(next(iterators["text"]), batch_abs, batch_sh, "text", local)
    with jax.transfer_guard("disallow"):
      state, metrics = compiled(state, {}, {"text": batch})
    return state, metrics, None

  handler = StepHandler(total_steps=total_steps, log_every=s.train.log_every,
                        max_consecutive_nonfinite=s.train.max_consecutive_nonfinite,
                        writer=writer, start_step=step, on_step=on_step,
                        throughput=lambda _, dt: {"tokens_per_second": b * length / dt})
  try:
    state, step, stopped = run_loop(
        state, step=step, total_steps=total_steps, train_step=train_step, handler=handler,
        checkpointer=checkpointer if s.checkpoint.enabled else None,
        data_states=lambda: {"text": iterators["text"].get_state()}, stop_at=stop_at)
  finally:
    checkpointer.close()
    writer.close()
  summary.update(step=step, stopped=stopped, history=writer.history)
  if stopped != "done":
    return summary

  # ------------------------------------------------------------------ Validation, export
  summary["val_loss"] = validation_loss(model, state["params"], ts.shardings["params"],
                                        val_rows, batch_abs, batch_sh, mesh, s.mesh.rules)
  export = str(workdir / "export" / "lm")
  params_io.save_params(export, state["params"], {
      "component": "lm", "step": step, "val_loss": summary["val_loss"],
      "lm_config": to_config_dict(s.model).to_dict(), "source": "flamingo_jax.trainers.lm.train"})
  summary["export"] = export
  log.info("step %d: validation loss %.4f; exported the LM to %s", step, summary["val_loss"],
           export)
  return summary


def validation_loss(model, params, param_sh, val_rows, batch_abs, batch_sh, mesh, rules):
  """Mean token NLL over the held-out rows, in whole batches (nan if there are none)."""
  b = batch_abs["tokens"].shape[0]
  local = process_rows(mesh, b)

  def loss(params, batch):
    nll, count = objective.token_nll(model.apply({"params": params}, batch["tokens"]),
                                     batch["targets"], batch["loss_mask"])
    return nll / jnp.maximum(count, 1.0)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(loss, in_shardings=(param_sh, batch_sh),
                 out_shardings=sharding.replicated(mesh))
    losses = [float(fn(params, put_batch(lm_batch(val_rows[i:i + b][local[0]:local[1]]),
                                         batch_abs, batch_sh, "val", local)))
              for i in range(0, len(val_rows) - b + 1, b)]
  return float(np.mean(losses)) if losses else float("nan")


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, overrides = cli.parse_args(argv, __doc__, "checkpoints, metrics, history, export/lm")
  summary = run(load(args.config, overrides), args.workdir, compile_only=args.compile_only,
                stop_at=args.stop_at)
  print(json.dumps({k: v for k, v in summary.items() if k != "history"}, sort_keys=True))
  return 0


def cli_main() -> int:
  """`python -m flamingo_jax.lm_pretrain`: exit 0, or 2 with one `error:` line for bad input."""
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(cli_main())
