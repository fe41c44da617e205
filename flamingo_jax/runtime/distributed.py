"""Multi-process start-up: jax.distributed.initialize from config or environment.

Which processes form the job, in order of precedence:
  1. config `distributed.{coordinator_address, num_processes, process_id}`;
  2. environment JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
     (what launch/*.sh export for a hand-made cluster);
  3. a detected cluster: SLURM (srun with more than one task), a multi-host
     TPU slice, Open MPI -- jax.distributed.initialize() reads those itself;
     `distributed.mode = "on"` calls it even when no variable announces the
     cluster (TPU VMs, whose topology JAX reads from the metadata server);
  4. otherwise a single process (nothing to initialise).
Must run before anything touches a JAX device. Each process then feeds the
rows of the global batch its own devices hold (see data/in_memory.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax

from flamingo_jax.config import from_config_dict
from flamingo_jax.errors import ConfigError

log = logging.getLogger(__name__)


def fake_cpu_devices(n: int, flag: str = "--fake_devices") -> None:
  """Run on n fake CPU devices (`--fake_devices=N`: a mesh's sharding, or whether a config
  fits a topology, checked without the hardware). Must run before JAX starts its backends;
  where they already run on n CPU devices (an in-process caller, a test) it is a no-op."""
  if n < 0:
    raise ConfigError(f"{flag} must be >= 0, got {n}")
  if n == 0:
    return
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # backends already initialised
    devices = jax.devices()
    if not (len(devices) == n and devices[0].platform == "cpu"):
      raise ConfigError(f"{flag}={n}: JAX already runs on {len(devices)} "
                        f"{devices[0].platform} devices in this process") from None


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """`distributed` section of a config."""
  mode: str = "auto"  # auto | on (always initialise; JAX finds the cluster) | off
  coordinator_address: str = ""  # host:port of process 0
  num_processes: int = 0
  process_id: int = -1
  local_device_ids: tuple[int, ...] = ()  # e.g. one GPU per process
  initialization_timeout: int = 300  # seconds


def distributed_config(cfg: Any) -> DistributedConfig:
  c = cfg if isinstance(cfg, DistributedConfig) else from_config_dict(
      DistributedConfig, cfg or {}, "distributed")
  if c.mode not in ("auto", "on", "off"):
    raise ValueError(f"config key 'distributed.mode' is {c.mode!r}; expected 'auto', 'on' "
                     "or 'off'")
  return c


def explicit_settings(c: DistributedConfig) -> dict:
  """Coordinator settings from config, else JAX_* environment variables ({} if none)."""
  env = os.environ
  address = c.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  num = c.num_processes or int(env.get("JAX_NUM_PROCESSES", "0") or 0)
  pid = c.process_id if c.process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1") or -1)
  given = {"coordinator_address": bool(address), "num_processes": num > 0,
           "process_id": pid >= 0}
  if not any(given.values()):
    return {}
  if not all(given.values()):
    missing = [k for k, ok in given.items() if not ok]
    raise ValueError(
        f"multi-process settings are incomplete: missing {missing} (set distributed.<key> "
        "in the config or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
  if not 0 <= pid < num:
    raise ValueError(f"distributed.process_id={pid} must be in [0, num_processes={num})")
  return dict(coordinator_address=address, num_processes=num, process_id=pid)


def detected_cluster() -> str:
  """Name of a multi-process environment JAX can initialise from, or ''."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
    return "slurm"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "mpi"
  return ""


def initialize(c: DistributedConfig) -> None:
  """Calls jax.distributed.initialize when this is a multi-process job."""
  if c.mode == "off" or jax.distributed.is_initialized():
    return
  kwargs = explicit_settings(c)
  if c.local_device_ids:
    kwargs["local_device_ids"] = list(c.local_device_ids)
  if kwargs.get("coordinator_address"):
    log.info("jax.distributed.initialize: process %d of %d, coordinator %s",
             kwargs["process_id"], kwargs["num_processes"], kwargs["coordinator_address"])
  elif detected_cluster() or c.mode == "on":
    log.info("jax.distributed.initialize from the %s environment",
             detected_cluster() or "cluster (mode 'on')")
  else:
    return
  jax.distributed.initialize(initialization_timeout=c.initialization_timeout, **kwargs)


_barriers = 0


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Waits until every process reaches this point, on the coordination service.

  Used before the first step, so every process has compiled before any steps
  (processes finish compiling at different times); the coordination service's
  barrier waits up to `timeout_s`. A no-op in a single process.
  """
  global _barriers
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the client has no public accessor
  client = jax_distributed.global_state.client
  if client is None:
    return
  _barriers += 1
  client.wait_at_barrier(f"flamingo_jax/{name}/{_barriers}", int(timeout_s * 1000))
