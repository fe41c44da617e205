"""The command line and config sections every trainer shares.

--config FILE[:arg] --workdir DIR [overrides]: `load` is the one place a trainer's
config gets its defaults, filled in before the `--config.a.b=value` overrides are
applied, so every trainer accepts an override of any key its schema knows (also when
the config file leaves the section out), rejects a typo naming it, and adds keys to
dict-valued fields (`--config.model_init.lm=PATH`). A trainer's `run` takes the loaded
config (a config without defaults parses the same; only config.json shows less).
The mesh, checkpoint and distributed sections and the loop's part of `train` are
parsed here, once for every trainer.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

from flamingo_jax.config import (apply_overrides, from_config_dict, load_config,
                                 split_config_args, with_defaults)
from flamingo_jax.errors import ArgumentParser
from flamingo_jax.runtime import distributed
from flamingo_jax.runtime.distributed import DistributedConfig, distributed_config
from flamingo_jax.runtime.sharding import MeshConfig, mesh_config
from flamingo_jax.training.checkpoint import CheckpointConfig, checkpoint_config
from flamingo_jax.training.loop import LoopConfig, check_loop_config

# The sections every trainer has beside its own `train` and `optim` (their schemas).
RUN_SECTIONS = {"mesh": MeshConfig, "checkpoint": CheckpointConfig,
                "distributed": DistributedConfig}


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """The RUN_SECTIONS of a config, validated; each trainer's Setup extends it."""
  mesh: MeshConfig
  checkpoint: CheckpointConfig
  distributed: DistributedConfig


def section(config: Any, name: str) -> Any:
  """config's section `name`, or None where the config leaves it out (all defaults)."""
  return config.get(name) if name in config else None


def run_sections(config: Any) -> dict[str, Any]:
  """RunSetup's fields (mesh, checkpoint, distributed), parsed; errors name the key."""
  return {"mesh": mesh_config(section(config, "mesh")),
          "checkpoint": checkpoint_config(section(config, "checkpoint")),
          "distributed": distributed_config(section(config, "distributed"))}


def train_section(config: Any, cls: type[LoopConfig]) -> LoopConfig:
  """The `train` section as cls (a LoopConfig subclass), the loop's fields checked."""
  c = from_config_dict(cls, section(config, "train") or {}, "train")
  check_loop_config(c)
  return c


def with_default_sections(config: ml_collections.ConfigDict, sections: Mapping[str, type],
                          extra: Optional[Mapping[str, Any]] = None
                          ) -> ml_collections.ConfigDict:
  """config with the trainer's `sections` (name -> schema) and RUN_SECTIONS present and
  every key they leave out at its default; `extra`: other sections' defaults (dicts)."""
  defaults = {name: cls() for name, cls in {**sections, **RUN_SECTIONS}.items()}
  return with_defaults(config, {**defaults, **(extra or {})})


class _NoMetadataWarning(logging.Filter):
  """orbax warns through absl that a step's state/ lacks _CHECKPOINT_METADATA whenever a
  checkpoint is read that a CheckpointManager did not write: every one of ours
  (training/checkpoint.py writes its own layout). It says nothing about the checkpoint."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "_CHECKPOINT_METADATA" not in record.getMessage()


def quiet_checkpoint_metadata_warning() -> None:
  absl_log = logging.getLogger("absl")
  if not any(isinstance(f, _NoMetadataWarning) for f in absl_log.filters):
    absl_log.addFilter(_NoMetadataWarning())


class _CurrentStderr(logging.StreamHandler):
  """Writes to whatever sys.stderr is when a record comes, not the stream of the call that
  set logging up: an in-process caller (a notebook, a test's captured stderr) may replace
  and close that stream, which would turn every later log line into a logging error."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value


def setup_logging() -> None:
  """flamingo_jax.* INFO logs to stderr with timestamps (the progress line among them)."""
  quiet_checkpoint_metadata_warning()
  package_log = logging.getLogger("flamingo_jax")
  if any(getattr(h, "_flamingo_cli", False) for h in package_log.handlers):
    return
  handler = _CurrentStderr()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  handler._flamingo_cli = True
  package_log.addHandler(handler)
  package_log.setLevel(logging.INFO)
  package_log.propagate = False


def parse_args(argv: Optional[Sequence[str]], doc: str, workdir_help: str,
               extra: Optional[Callable[[argparse.ArgumentParser], None]] = None):
  """-> (args, overrides). Sets up logging and, with --fake_devices, a CPU mesh."""
  argv = sys.argv[1:] if argv is None else list(argv)
  rest, overrides = split_config_args(argv)
  parser = ArgumentParser(description=doc.split("\n\n")[0])  # usage errors: one line
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--workdir", required=True, help=workdir_help)
  parser.add_argument("--compile_only", action="store_true",
                      help="lower and compile the step for the configured mesh, print memory "
                           "per device and exit")
  parser.add_argument("--fake_devices", type=int, default=0,
                      help="run on this many fake CPU devices (with --compile_only: check "
                           "that a config fits a topology without the hardware)")
  parser.add_argument("--stop_at", type=int, default=None,
                      help="stop after this step with a checkpoint (time-boxed jobs)")
  if extra is not None:
    extra(parser)
  args = parser.parse_args(rest)
  setup_logging()
  distributed.fake_cpu_devices(args.fake_devices)
  return args, overrides


def load(spec: str, overrides: Sequence[str],
         with_default_sections: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict],
         open_keys: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config file, its defaults filled (by the trainer's with_default_sections), then
  the overrides."""
  return apply_overrides(with_default_sections(load_config(spec)), overrides, open_keys)
