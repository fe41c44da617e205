"""Text-only pretraining of the decoder LM that Flamingo later freezes.

  python -m flamingo_jax.lm_pretrain --config configs/lm_pretrain_demo.py:demo_workdir \
      --workdir demo_workdir/lm [--config.train.total_steps=300 ...]

Flamingo starts from a pretrained LM (Chinchilla in the paper); the demo
trains a tiny one first, on the text of its synthetic world. The corpus
(`corpus.paths`, one document a line) is tokenised as <BOS> ids <EOS> (no <BOS>
when the tokenizer's add_bos is False, as in the Flamingo layouts),
concatenated and cut into rows of seq_len + 1 tokens; `corpus.val_fraction`
of the rows is held out for a validation loss. Batch k of an epoch is a fixed
function of (seed, k), and the batch index is the data state saved in every
checkpoint, so a resumed run replays exactly the batches an uninterrupted run
would have seen. The loss is objective.token_nll; the step, mesh and
shardings, checkpoints (with SIGTERM), non-finite skip and metrics are the
training library's (flamingo_jax/training/). At the end the LM is exported as
a parameter checkpoint (`WORKDIR/export/lm`, the tree Flamingo's `lm`
component holds) that a Flamingo config loads with `model_init.lm`.
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
from etils import epath

from flamingo_jax.runtime import params_io
from flamingo_jax.config import from_config_dict, to_config_dict, with_defaults
from flamingo_jax.models.config import LMConfig
from flamingo_jax.errors import ConfigError, DataError, run_cli
from flamingo_jax.models.lm import DecoderLM
from flamingo_jax.training import checkpoint as ckpt_lib
from flamingo_jax.training import cli, objective, optim
from flamingo_jax.runtime import distributed
from flamingo_jax.runtime import sharding
from flamingo_jax.training import state as state_lib
from flamingo_jax.training.loop import (LoopConfig, StepHandler, batch_shardings,
                                        check_batch_sizes, check_loop_config, prepare_workdir,
                                        process_rows, put_batch, run_loop)
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
class CorpusConfig:
  """`corpus` section: the text and how it becomes rows."""
  paths: tuple[str, ...] = ()  # text files, one document a line
  tokenizer: str = ""  # sentencepiece .model (or a Hugging Face tokenizer)
  seq_len: int = 64  # tokens a row feeds the LM (rows hold seq_len + 1)
  val_fraction: float = 0.02  # rows held out for the validation loss


@dataclasses.dataclass(frozen=True)
class LMOptimConfig(optim.OptimConfig):
  """`optim` section: AdamW, warm-up then cosine decay to end_learning_rate; no weight
  decay on norms and biases (1-D leaves), as is usual for LMs."""
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  schedule: str = "cosine"
  end_learning_rate: float = 3e-4


SECTIONS = {"train": TrainConfig, "corpus": CorpusConfig, "optim": LMOptimConfig,
            **cli.RUN_SECTIONS}


@dataclasses.dataclass(frozen=True)
class Setup:
  """Every section, validated once."""
  model: LMConfig
  train: TrainConfig
  corpus: CorpusConfig
  optim: LMOptimConfig
  mesh: sharding.MeshConfig
  checkpoint: ckpt_lib.CheckpointConfig
  distributed: distributed.DistributedConfig


def with_default_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The sections and keys a config leaves out, with their defaults (before overrides)."""
  return with_defaults(config, {name: cls() for name, cls in SECTIONS.items()})


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Parses and checks every section once; errors name the key."""
  if "model" not in config:
    raise ConfigError("config has no 'model' section (the LMConfig to train)")
  model = from_config_dict(LMConfig, config.model, "model")
  train = from_config_dict(TrainConfig, config.get("train") or {}, "train")
  check_loop_config(train)
  corpus = from_config_dict(CorpusConfig, config.get("corpus") or {}, "corpus")
  for key, v in (("train.batch_size", train.batch_size), ("corpus.seq_len", corpus.seq_len)):
    if v <= 0:
      raise ConfigError(f"config key '{key}' must be a positive int, got {v}")
  if not 0.0 <= corpus.val_fraction < 0.5:
    raise ConfigError(f"config key 'corpus.val_fraction' must be in [0, 0.5), got "
                      f"{corpus.val_fraction}")
  if corpus.seq_len > model.max_length and model.positions == "learned":
    raise ConfigError(f"config key 'corpus.seq_len' ({corpus.seq_len}) exceeds "
                      f"model.max_length ({model.max_length}) of learned positions")
  return Setup(model=model, train=train, corpus=corpus,
               optim=optim.optim_config(config.get("optim"), LMOptimConfig),
               mesh=sharding.mesh_config(config.get("mesh")),
               checkpoint=ckpt_lib.checkpoint_config(config.get("checkpoint")),
               distributed=distributed.distributed_config(config.get("distributed")))


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  return cli.load(spec, overrides, with_default_sections)


# --------------------------------------------------------------------------
# Data: rows of the corpus, batch k a fixed function of (seed, k)


def token_rows(lines: Sequence[str], tokenizer, seq_len: int) -> np.ndarray:
  """Lines -> <BOS> ids <EOS> concatenated, cut into rows [N, seq_len + 1] int32."""
  from flamingo_jax.data.layouts import prefix
  info = tokenizer.info
  stream: list[int] = []
  for line in lines:
    line = line.strip()
    if line:
      stream.extend([*prefix(info), *tokenizer.encode(line), info.eos_id])
  n = len(stream) // (seq_len + 1)
  if n < 2:
    raise DataError(f"lm_pretrain: the corpus has {len(stream)} tokens, fewer than two rows "
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


def lm_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
  """Rows [B, L + 1] -> objective's batch: tokens, targets [B, L] int32, loss_mask [B, L]."""
  return {"tokens": rows[:, :-1], "targets": rows[:, 1:],
          "loss_mask": np.ones(rows[:, 1:].shape, np.float32)}


class RowBatches:
  """This process's rows of batch k = batch_at(rows, k, ...); the state is k."""

  def __init__(self, rows: np.ndarray, batch_size: int, seed: int, local: tuple[int, int]):
    self.rows, self.batch_size, self.seed, self.local = rows, batch_size, seed, local
    self.batch_index = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = batch_at(self.rows, self.batch_index, self.batch_size, self.seed)
    self.batch_index += 1
    return lm_batch(batch[self.local[0]:self.local[1]])

  def get_state(self) -> dict:
    return {"batch_index": int(self.batch_index)}

  def set_state(self, state: dict) -> None:
    self.batch_index = int(state["batch_index"])


# --------------------------------------------------------------------------
# Model, optimizer, step


def make_optimizer(c: LMOptimConfig, total_steps: int) -> optax.GradientTransformation:
  schedule = optim.learning_rate_schedule(c, total_steps)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
  adamw = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                      mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw) if c.clip_norm else adamw


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


def _history(path: epath.Path, upto: int) -> list[dict]:
  """The logged steps <= upto (a killed run may have logged steps past its checkpoint)."""
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  rows = [r for r in rows if r["step"] <= upto]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # the rest is replayed
  return rows


# --------------------------------------------------------------------------
# The run


def run(config: ml_collections.ConfigDict, workdir: str, *, compile_only: bool = False,
        stop_at: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None,
        on_step: Optional[Callable[[int, dict], None]] = None,
        lines: Optional[Sequence[str]] = None, tokenizer: Any = None) -> dict:
  """Trains the LM of `config`, resuming from workdir's checkpoints; exports
  workdir/export/lm when done. lines / tokenizer: the corpus and tokenizer in
  memory instead of corpus.paths / corpus.tokenizer.
  Returns {'step', 'stopped', 'history', 'memory', 'val_loss', 'export'}.
  """
  # ------------------------------------------------------------------ Config, data, workdir
  config = with_default_sections(config)
  s = setup(config)
  distributed.initialize(s.distributed)
  if tokenizer is None:
    if not s.corpus.tokenizer:
      raise ConfigError("config key 'corpus.tokenizer' is empty")
    from flamingo_jax.data.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(s.corpus.tokenizer)
  if s.model.vocab_size < tokenizer.info.vocab_size:
    raise DataError(f"lm_pretrain: model.vocab_size {s.model.vocab_size} is smaller than the "
                    f"tokenizer's vocabulary {tokenizer.info.vocab_size} "
                    f"({s.corpus.tokenizer or 'the tokenizer given'})")
  if lines is None:
    if not s.corpus.paths:
      raise ConfigError("config key 'corpus.paths' is empty (text files, a document a line)")
    lines = [line for p in s.corpus.paths for line in epath.Path(p).read_text().splitlines()]
  rows = token_rows(lines, tokenizer, s.corpus.seq_len)
  train_rows, val_rows = split_rows(rows, s.corpus.val_fraction, s.train.seed)
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
  history_path = workdir / "history.jsonl"
  history = _history(history_path, step) if jax.process_index() == 0 else []
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)

  def every_step(done, metrics):  # the per-step history (plots, exact-resume checks)
    row = {"step": done, **{k: v for k, v in metrics.items() if k != "step"}}
    history.append(row)
    if jax.process_index() == 0:
      with history_path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if on_step is not None:
      on_step(done, row)

  def train_step(state, step):
    batch = put_batch(next(iterators["text"]), batch_abs, batch_sh, "text", local)
    with jax.transfer_guard("disallow"):
      state, metrics = compiled(state, {}, {"text": batch})
    return state, metrics, None

  handler = StepHandler(total_steps=total_steps, log_every=s.train.log_every,
                        max_consecutive_nonfinite=s.train.max_consecutive_nonfinite,
                        writer=writer, start_step=step, on_step=every_step,
                        throughput=lambda _, dt: {"tokens_per_second": b * length / dt})
  try:
    state, step, stopped = run_loop(
        state, step=step, total_steps=total_steps, train_step=train_step, handler=handler,
        checkpointer=checkpointer if s.checkpoint.enabled else None,
        data_states=lambda: {"text": iterators["text"].get_state()}, stop_at=stop_at)
  finally:
    checkpointer.close()
    writer.close()
  summary.update(step=step, stopped=stopped, history=history)
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
  """`python -m flamingo_jax.lm_pretrain`: exit status 0, or 2 with one `error:` line for bad input."""
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(cli_main())
