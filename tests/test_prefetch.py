"""flamingo_jax.prefetch: batches come in the order the schedule asks for,
get_state() is the state after the last CONSUMED batch however far the producer
is ahead (exact resume), producer errors reach the consumer, close() and
SIGTERM never leave a thread hanging; device batches carry their shardings."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from flamingo_jax.trainers.flamingo import layout
from flamingo_jax.data import in_memory
from flamingo_jax.errors import DataError
from flamingo_jax.runtime import sharding
from flamingo_jax.training.loop import process_rows, put_batch
from flamingo_jax.training.prefetch import Prefetcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Counter:
  """A BatchIterator whose batch i is {'x': [tag, i]}; fails or stalls on request."""

  def __init__(self, tag, fail_at=None, stall_at=None):
    self.tag, self.i = tag, 0
    self.fail_at, self.stall_at = fail_at, stall_at
    self.release = threading.Event()
    self.thread_names = set()

  def __next__(self):
    self.thread_names.add(threading.current_thread().name)
    if self.i == self.fail_at:
      raise DataError(f"dataset {self.tag!r}: shard 3 is truncated")
    if self.i == self.stall_at:
      self.release.wait()
    out = {"x": np.array([self.tag, self.i])}
    self.i += 1
    return out

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def alternating(step):
  return ("a",) if step % 3 else ("a", "b")


def take(p, n):
  return [{k: v["x"].tolist() for k, v in next(p).items()} for _ in range(n)]


def wait_until(predicate, timeout=10.0):
  t0 = time.monotonic()
  while not predicate():
    if time.monotonic() - t0 > timeout:
      raise AssertionError("condition not reached")
    time.sleep(0.01)


@pytest.mark.parametrize("depth", [1, 3])
def test_order_equals_the_synchronous_reference(depth):
  ref = Prefetcher({"a": Counter(0), "b": Counter(1)}, lambda n, b: b, alternating, depth=0)
  want = take(ref, 10)
  assert want[0] == {"a": [0, 0], "b": [1, 0]} and want[1] == {"a": [0, 1]}
  its = {"a": Counter(0), "b": Counter(1)}
  with Prefetcher(its, lambda n, b: b, alternating, depth=depth) as p:
    assert take(p, 10) == want
    assert p.step == 10
  assert its["a"].thread_names == {"prefetch"}  # made on the background thread


def test_state_is_that_of_the_consumed_batches_and_resumes_exactly():
  ref = Prefetcher({"a": Counter(0), "b": Counter(1)}, lambda n, b: b, alternating, depth=0)
  want = take(ref, 12)
  its = {"a": Counter(0), "b": Counter(1)}
  p = Prefetcher(its, lambda n, b: b, alternating, depth=4)
  assert p.get_state() == {"a": {"i": 0}, "b": {"i": 0}}
  got = take(p, 5)  # steps 0..4: a 5 batches, b 2 (steps 0, 3)
  wait_until(lambda: its["a"].i == 9)  # the producer is 4 batches ahead
  state = p.get_state()
  assert state == {"a": {"i": 5}, "b": {"i": 2}}
  p.close()
  resumed = {"a": Counter(0), "b": Counter(1)}
  for n, s in state.items():
    resumed[n].set_state(s)
  with Prefetcher(resumed, lambda n, b: b, alternating, start_step=5, depth=2) as q:
    got += take(q, 7)
  assert got == want


class Counted(Counter):
  """A Counter with data counters (flamingo_jax.data.accounting's stats())."""

  def stats(self):
    return {"examples_seen": 3 * self.i, "examples_kept": 2 * self.i}


def test_stats_are_those_of_the_consumed_batches():
  its = {"a": Counted(0), "b": Counted(1)}
  with Prefetcher(its, lambda n, b: b, alternating, depth=4) as p:
    assert p.stats() == {"a": {"examples_seen": 0, "examples_kept": 0},
                         "b": {"examples_seen": 0, "examples_kept": 0}}
    take(p, 5)  # a: 5 batches, b: 2
    wait_until(lambda: its["a"].i == 9)  # read ahead: not counted
    assert p.stats() == {"a": {"examples_seen": 15, "examples_kept": 10},
                         "b": {"examples_seen": 6, "examples_kept": 4}}


def test_producer_error_reaches_the_consumer_after_the_good_batches():
  its = {"a": Counter(0, fail_at=3)}
  with Prefetcher(its, lambda n, b: b, lambda s: ("a",), depth=2) as p:
    assert [b["a"]["x"][1] for b in (next(p), next(p), next(p))] == [0, 1, 2]
    with pytest.raises(DataError, match="shard 3 is truncated"):
      next(p)
    assert p.get_state() == {"a": {"i": 3}}
    with pytest.raises(StopIteration):
      next(p)

  def bad_put(name, batch):
    raise ValueError(f"dataset {name!r} batch has no 'tokens'")

  with Prefetcher({"a": Counter(0)}, bad_put, lambda s: ("a",), depth=1) as p:
    with pytest.raises(ValueError, match="has no 'tokens'"):
      next(p)


def test_end_of_data_is_stop_iteration():
  class Three(Counter):
    def __next__(self):
      if self.i == 3:
        raise StopIteration
      return super().__next__()

  with Prefetcher({"a": Three(0)}, lambda n, b: b, lambda s: ("a",), depth=2) as p:
    assert len(list(p)) == 3


def test_close_stops_a_blocked_and_a_stalled_producer():
  its = {"a": Counter(0)}
  p = Prefetcher(its, lambda n, b: b, lambda s: ("a",), depth=2)
  wait_until(lambda: p._queue.full())  # producer blocked on the full queue
  t0 = time.monotonic()
  p.close()
  assert time.monotonic() - t0 < 2 and not p._thread.is_alive()
  with pytest.raises(RuntimeError, match="closed"):
    next(p)
  p.close()  # idempotent

  stalled = {"a": Counter(0, stall_at=1)}
  p = Prefetcher(stalled, lambda n, b: b, lambda s: ("a",), depth=2)
  next(p)
  wait_until(lambda: 1 in [stalled["a"].i] and p._queue.empty())
  p.close(timeout=0.2)  # returns although the producer is inside next()
  assert p._thread.daemon and p._thread.is_alive()
  stalled["a"].release.set()
  p._thread.join(5)
  assert not p._thread.is_alive()  # and it exits once next() returns


def test_put_batch_on_the_producer_thread_gives_sharded_device_batches(tiny_config):
  spec = in_memory.DatasetSpec("interleaved", "interleaved", batch_size=8, seq_len=16,
                               max_images=2)
  mesh = sharding.make_mesh(sharding.MeshConfig())  # 8 fake devices, data-parallel
  abstract = layout.abstract_batch(spec, tiny_config, tiny_config.vision.image_size, 4)
  shardings = {k: NamedSharding(mesh, sharding.batch_spec(len(a.shape)))
               for k, a in abstract.items()}
  rows = process_rows(mesh, spec.batch_size)

  def put(name, host):
    return put_batch(host, abstract, shardings, name, rows)

  ref = in_memory.SyntheticIterator(spec, tiny_config, rows=rows)
  it = in_memory.SyntheticIterator(spec, tiny_config, rows=rows)
  with Prefetcher({"interleaved": it}, put, lambda s: ("interleaved",), depth=2) as p:
    for _ in range(3):
      got = next(p)["interleaved"]
      want = next(ref)
      for k, v in want.items():
        assert got[k].sharding == shardings[k]
        np.testing.assert_array_equal(np.asarray(got[k]), v)
    assert p.get_state() == {"interleaved": ref.get_state()} == {"interleaved": {"batch_index": 3}}


SIGTERM_SCRIPT = textwrap.dedent("""
    import contextlib, itertools, signal, sys, threading, time
    sys.path.insert(0, {repo!r})
    from flamingo_jax.training.prefetch import Prefetcher

    class Forever:
      def __init__(self): self.i = 0
      def __next__(self):
        time.sleep(0.01); self.i += 1; return self.i
      def get_state(self): return {{"i": self.i}}

    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))  # as train.StopSignal
    p = Prefetcher({{"a": Forever()}}, lambda n, b: b, lambda s: ("a",), depth=3)
    print("ready", flush=True)
    mode = sys.argv[1]
    with p if mode == "close" else contextlib.nullcontext():
      for step in itertools.count():
        next(p)
        if stop:
          break
        time.sleep(0.02)
    print("consumed", p.step, p.get_state()["a"]["i"], flush=True)
    print("threads", threading.active_count() - (mode != "close"), flush=True)
""")


@pytest.mark.parametrize("mode", ["close", "no_close"])
def test_sigterm_and_exit_leave_no_hanging_thread(tmp_path, mode):
  script = tmp_path / "loop.py"
  script.write_text(SIGTERM_SCRIPT.format(repo=REPO))
  proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "ready"
  time.sleep(0.3)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=20)  # a hanging producer would time out here
  assert proc.returncode == 0
  lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
  steps, state = map(int, lines["consumed"].split())
  assert state == steps  # batch i+1 was consumed at step i: state of the consumed ones
  assert lines["threads"] == "1"  # (without close the daemon producer is discounted)


def test_synthetic_input_made_once_is_reused_exactly(tiny_config):
  spec = in_memory.DatasetSpec("pairs", "pairs", batch_size=2, seq_len=8)
  fresh = in_memory.SyntheticIterator(spec, tiny_config)
  want = [next(fresh) for _ in range(2)]
  it = in_memory.SyntheticIterator(spec, tiny_config, distinct_batches=2, nan_batches=(2,))
  got = [next(it) for _ in range(5)]
  assert it.get_state() == {"batch_index": 5}
  for i, batch in enumerate(got):
    for k, v in want[i % 2].items():
      if i == 2 and k == "images":
        assert np.isnan(batch[k]).all()  # NaN batches still work ...
      else:
        np.testing.assert_array_equal(batch[k], v)
  assert got[4] is got[0]  # ... on a copy: batch 0 was made once and is intact
  assert not np.array_equal(got[0]["images"], got[1]["images"])
  with pytest.raises(ValueError, match="synthetic.distinct_batches"):
    in_memory.synthetic_config({"distinct_batches": -1, "datasets": {"p": {"kind": "pairs"}}})
