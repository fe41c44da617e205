"""Child processes that exit when the process that started them dies (stdlib only).

A daemon thread waits for the parent to exit and then ends this process with
`os._exit`. It waits on a pidfd (Linux >= 5.3: woken the moment the parent
exits) or else polls `os.getppid()`. PR_SET_PDEATHSIG is not used: it fires
when the parent *thread* that forked the child exits, and grain starts its
workers from short-lived pool threads.

Two places start the watch in grain's worker processes (data/workers.py):
`watch_parent_if_spawned()`, run by `import flamingo_jax`, covers a worker
still starting up (a spawned child imports the parent's main module, and with
it JAX, for seconds before grain's initialiser runs); the initialiser then
watches the parent pid the pipeline recorded, which also covers a parent
that died before the child got this far.
"""
from __future__ import annotations

import os
import select
import sys
import threading
from typing import Callable

POLL_S = 0.5  # getppid polling interval where pidfd_open is unavailable
EXIT_STATUS = 70  # os._exit status of a child whose parent died (EX_SOFTWARE)
_watched: set[int] = set()
_lock = threading.Lock()


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


def watch_parent(parent_pid: int, on_exit: Callable[[], None] = _exit_now
                 ) -> threading.Thread | None:
  """Starts a daemon thread that calls `on_exit` once `parent_pid` has exited.

  Once per parent pid with the default `on_exit` (None when already watched).
  """
  with _lock:
    if on_exit is _exit_now:
      if parent_pid in _watched:
        return None
      _watched.add(parent_pid)
  t = threading.Thread(target=_watch, args=(parent_pid, on_exit), daemon=True,
                       name=f"flamingo-watch-parent-{parent_pid}")
  t.start()
  return t


def watch_parent_if_spawned() -> None:
  """In a multiprocessing "spawn" child still being prepared (importing the parent's
  main module), watch the parent now. Anywhere else: nothing."""
  mp = sys.modules.get("multiprocessing.process")
  if mp is not None and getattr(mp.current_process(), "_inheriting", False):
    watch_parent(os.getppid())
