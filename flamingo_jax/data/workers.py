"""grain worker processes that die with the process that started them.

grain starts its `mp_prefetch` workers with multiprocessing's "spawn"
context and stops them only from the parent (`close()`, or an atexit
finaliser). A parent killed with SIGKILL runs neither, and its workers
(hundreds of MiB each) then block forever on a full output queue. They also
hold the write end of multiprocessing's resource-tracker pipe, so the
tracker, which exits (unlinking leaked shared memory) once every writer is
gone, stays alive with them.

`worker_init_fn(parent_pid)` is passed to `mp_prefetch`: each worker starts a
daemon thread that waits for the parent to exit and then ends the worker
with `os._exit`. It waits on a pidfd (Linux >= 5.3: woken the moment the
parent exits) or else polls `os.getppid()`. PR_SET_PDEATHSIG is not used: it
fires when the parent *thread* that forked the worker exits, and grain starts
workers from short-lived pool threads. With the workers gone, the resource
tracker sees EOF and exits by itself.
"""
from __future__ import annotations

import functools
import os
import select
import threading
from typing import Callable

POLL_S = 0.5  # getppid polling interval where pidfd_open is unavailable
EXIT_STATUS = 70  # os._exit status of a worker whose parent died (EX_SOFTWARE)


def _parent_gone(parent_pid: int) -> bool:
  return os.getppid() != parent_pid


def _wait_for_exit(parent_pid: int) -> None:
  """Blocks until `parent_pid` has exited (or is no longer this process's parent)."""
  if _parent_gone(parent_pid):
    return
  try:
    fd = os.pidfd_open(parent_pid)
  except (AttributeError, OSError):  # not Linux, old kernel, or already gone
    fd = None
  if fd is not None:
    try:
      # Re-check: the pid may have been reused between getppid and pidfd_open.
      if not _parent_gone(parent_pid):
        select.select([fd], [], [])  # readable once the process has exited
      return
    finally:
      os.close(fd)
  while not _parent_gone(parent_pid):
    threading.Event().wait(POLL_S)


def _watch(parent_pid: int, on_exit: Callable[[], None]) -> None:
  _wait_for_exit(parent_pid)
  on_exit()


def _exit_now() -> None:
  os._exit(EXIT_STATUS)  # no atexit or finalisers: the parent they would talk to is gone


def watch_parent(parent_pid: int, on_exit: Callable[[], None] = _exit_now) -> threading.Thread:
  """Starts a daemon thread that calls `on_exit` once `parent_pid` has exited."""
  t = threading.Thread(target=_watch, args=(parent_pid, on_exit), daemon=True,
                       name=f"flamingo-watch-parent-{parent_pid}")
  t.start()
  return t


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
