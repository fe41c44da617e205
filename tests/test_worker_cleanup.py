"""kill -9 of a process reading data through grain workers leaves no process behind.

The reader is a real pipeline (tar shards, tokenizer, 2 grain worker
processes) iterating like a trainer; after SIGKILL its workers and
multiprocessing's resource tracker must exit by themselves within seconds,
both once the workers run and while they are still starting up.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from data_helpers import pair_members, write_tar
from flamingo_jax.process import process_watch

READER = textwrap.dedent("""
    import os, sys, time
    import flamingo_jax
    if __name__ == "__mp_main__" and os.environ.get("SLOW_WORKER_START"):
      time.sleep(60)  # a worker still importing (JAX takes seconds) when the parent dies
    from flamingo_jax.data import data_config, make_mixture

    if __name__ == "__main__":
      tar, tok = sys.argv[1:3]
      data = data_config({
          "datasets": {"p": {"kind": "pairs", "paths": [tar], "batch_size": 2}},
          "tokenizer": tok, "image": {"size": 16}, "shard_index": 0, "shard_count": 1,
          "worker_count": 2, "worker_buffer_size": 2, "read_threads": 0,
          "read_buffer_size": 0})
      mixture = make_mixture(data)
      print("STARTED", flush=True)
      next(mixture)
      print("READY", flush=True)
      while True:  # a trainer that never closes its iterator
        next(mixture)
""")


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
  return [p for p in proc.children(recursive=True) if p.is_running()]


def _alive(procs) -> list[str]:
  out = []
  for p in procs:
    try:
      if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
        out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
    except psutil.NoSuchProcess:
      pass
  return out


@pytest.fixture(scope="module")
def reader(tmp_path_factory, small_tokenizer):
  d = tmp_path_factory.mktemp("reader")
  tar = write_tar(d / "p.tar", [m for i in range(16) for m in pair_members(i)])
  (d / "reader.py").write_text(READER)
  return [str(d / "reader.py"), tar, small_tokenizer]


def _kill_9_and_check(proc, children) -> None:
  proc.send_signal(signal.SIGKILL)
  proc.wait(10)
  deadline = time.monotonic() + 5
  while _alive(children) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not _alive(children), f"alive 5 s after kill -9 of the reader: {_alive(children)}"


@pytest.mark.parametrize("when", ["running", "starting"])
def test_kill_9_leaves_no_worker_or_resource_tracker(reader, when):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if when == "starting":
    env["SLOW_WORKER_START"] = "1"
  proc = subprocess.Popen([sys.executable, *reader], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True)  # the test's killpg cleans up on failure
  try:
    want = "READY" if when == "running" else "STARTED"
    line = proc.stdout.readline()
    if when == "running" and line.strip() == "STARTED":
      line = proc.stdout.readline()
    assert line.strip() == want, proc.stderr.read()[-3000:]
    deadline = time.monotonic() + 60
    while True:  # the tracker and both workers
      children = _descendants(psutil.Process(proc.pid))
      names = [" ".join(c.cmdline()) for c in children]
      if sum("spawn_main" in n for n in names) >= 2 or time.monotonic() > deadline:
        break
      time.sleep(0.1)
    assert sum("resource_tracker" in n for n in names) == 1, names
    assert sum("spawn_main" in n for n in names) >= 2, names
    if when == "starting":
      time.sleep(2)  # the workers are importing flamingo_jax (then sleep in the reader)
    _kill_9_and_check(proc, children)
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait(10)


WATCHED = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("process_watch", sys.argv[1])
    process_watch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(process_watch)
    w = int(sys.argv[2])
    if sys.argv[3] == "poll":
      del os.pidfd_open
    if os.fork() == 0:  # the watcher: a child of this script
      process_watch.watch_parent(os.getppid(), on_exit=lambda: (os.write(w, b"gone\\n"), os._exit(0)))
      time.sleep(5)
      os._exit(1)
    time.sleep(0.5)  # the watcher must not fire while its parent lives
    os.write(w, b"exiting\\n")
    os._exit(0)
""")


@pytest.mark.parametrize("mode", ["pidfd", "poll"])
def test_watch_parent_fires_when_the_parent_exits(tmp_path, mode):
  """The watchdog thread fires once its parent process has exited, not before."""
  script = tmp_path / "watched.py"
  script.write_text(WATCHED)
  r, w = os.pipe()
  proc = subprocess.Popen([sys.executable, str(script), process_watch.__file__, str(w), mode],
                          pass_fds=(w,))
  os.close(w)
  with os.fdopen(r, "rb") as f:
    out = f.read()  # EOF once both the script and its watcher have exited
  assert proc.wait(10) == 0
  assert out == b"exiting\ngone\n"
