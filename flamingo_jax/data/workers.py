"""grain worker processes that die with the process that started them.

grain starts its `mp_prefetch` workers with multiprocessing's "spawn"
context and stops them only from the parent (`close()`, or an atexit
finaliser). A parent killed with SIGKILL runs neither, and its workers
(hundreds of MiB each) then block forever on a full output queue. They also
hold the write end of multiprocessing's resource-tracker pipe, so the
tracker, which exits (unlinking leaked shared memory) once every writer is
gone, stays alive with them.

`worker_init_fn()` is passed to `mp_prefetch`: each worker watches the
parent (flamingo_jax/process_watch.py) and exits when it dies; `import
flamingo_jax` has already started the same watch while the worker was still
importing. With the workers gone, the resource tracker sees EOF and exits
by itself.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

from flamingo_jax.process.process_watch import watch_parent


def _init_worker(parent_pid: int, worker_index: int = 0, worker_count: int = 1) -> None:
  del worker_index, worker_count
  watch_parent(parent_pid)


def worker_init_fn(parent_pid: int | None = None) -> Callable[[int, int], None]:
  """The `worker_init_fn` for grain's `mp_prefetch`: the worker exits with this process.

  The parent pid is taken here, in the process that builds the pipeline (the
  one that starts the workers), not in the worker, which may already have
  been re-parented by the time its initialiser runs.
  """
  return functools.partial(_init_worker, os.getpid() if parent_pid is None else parent_pid)
