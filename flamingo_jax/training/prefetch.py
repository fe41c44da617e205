"""Host-side prefetching: the next steps' batches are read and put on the devices
on a background thread while the current step runs, so the accelerator never
waits for NumPy, decoding or host-to-device copies.

  prefetcher = Prefetcher(iterators, put, schedule=lambda step: variants[step % n],
                          start_step=step, depth=2)
  with prefetcher:
    while step < total_steps:
      batches = next(prefetcher)            # {name: device batch} for this step
      state, metrics = train_step(state, frozen, batches)
      step += 1
      checkpointer.save(step, state, prefetcher.get_state())   # consumed, not prefetched

Exact resume: the producer records each iterator's `get_state()` right after
the `next()` that made a batch and ships it with the batch, so `get_state()`
here is the data state after the last batch the consumer TOOK, however far
ahead the producer is. Restoring that state and starting a new Prefetcher at
the same step yields exactly the batches an uninterrupted run would have seen. The
iterators' data counters (`stats()`, flamingo_jax/data/accounting.py) travel the same
way: `stats()` here counts the examples of the consumed batches, never the read-ahead.

The iterators belong to the producer thread from the constructor to `close()`:
call their `set_state` before constructing, never `next`/`get_state` on them
while the Prefetcher is open.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how often a blocked producer checks for close()


def _stats(it) -> Optional[dict]:
  """it.stats() (the data counters) as a snapshot, None for iterators without them."""
  return dict(it.stats()) if callable(getattr(it, "stats", None)) else None


class _Failure:
  """An exception raised by the producer, delivered in order to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


class _End:
  """The schedule or an iterator ran out (StopIteration)."""


class Prefetcher:
  """Iterator of per-step batch dicts {dataset name: put(name, next(iterators[name]))}.

  iterators: {name: iterator} with get_state() (flamingo_jax.data.in_memory.BatchIterator).
  put(name, host_batch) -> device batch: e.g. train.put_batch with the dataset's
    abstract shapes, NamedShardings and rows. Runs on the producer thread.
  schedule(step) -> the dataset names step `step` reads (one tuple for every step
    with accumulate mixing, alternating tuples otherwise).
  start_step: the step the first batch is for (the restored step on resume).
  depth: batches made ahead (queue bound). Each holds device memory, so 1-2 is
    enough to hide the host; 0 makes every batch on demand, on the calling
    thread (no thread: for debugging and as the reference order).
  """

  def __init__(self, iterators: Mapping[str, Any], put: Callable[[str, Any], Any],
               schedule: Callable[[int], Sequence[str]], start_step: int = 0,
               depth: int = 2, name: str = "prefetch"):
    if depth < 0:
      raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    self._iterators = dict(iterators)
    self._put = put
    self._schedule = schedule
    self._next_step = start_step  # the step the producer makes next
    self._consumed_step = start_step  # the step the consumer takes next
    # State and counters after the last consumed batch of each dataset (initially: as given).
    self._states = {n: it.get_state() for n, it in self._iterators.items()}
    self._stats = {n: _stats(it) for n, it in self._iterators.items()}
    self._stats = {n: v for n, v in self._stats.items() if v is not None}
    self._depth = depth
    self._closed = threading.Event()
    self._done = False
    self._queue: Optional[queue.Queue] = None
    self._thread: Optional[threading.Thread] = None
    if depth > 0:
      self._queue = queue.Queue(maxsize=depth)
      self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
      self._thread.start()

  # ------------------------------------------------------------------ producer
  def _make(self) -> tuple[int, dict, dict, dict]:
    """(step, {name: device batch}, {name: iterator state after its batch}, {name:
    counters after its batch})."""
    step = self._next_step
    batches, states, stats = {}, {}, {}
    for n in self._schedule(step):
      it = self._iterators[n]
      host = next(it)
      states[n] = it.get_state()
      counts = _stats(it)
      if counts is not None:
        stats[n] = counts
      batches[n] = self._put(n, host)
    self._next_step += 1
    return step, batches, states, stats

  def _offer(self, item) -> bool:
    """Blocks until the queue takes `item`; False once closed."""
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      while not self._closed.is_set():
        try:
          item = self._make()
        except StopIteration:
          self._offer(_End())
          return
        except BaseException as e:  # noqa: BLE001 - re-raised on the consumer's thread
          self._offer(_Failure(e))
          return
        if not self._offer(item):
          return
    finally:
      log.debug("prefetch producer stopped at step %d", self._next_step)

  # ------------------------------------------------------------------ consumer
  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    if self._closed.is_set():
      raise RuntimeError("Prefetcher is closed")
    if self._done:
      raise StopIteration
    if self._queue is None:
      try:
        item = self._make()
      except StopIteration:
        self._done = True
        raise
    else:
      while True:
        try:
          item = self._queue.get(timeout=_POLL_S)
          break
        except queue.Empty:
          if not self._thread.is_alive() and self._queue.empty():
            raise RuntimeError("prefetch producer thread died without a result") from None
    if isinstance(item, _End):
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      raise item.error
    step, batches, states, stats = item
    assert step == self._consumed_step, (step, self._consumed_step)
    self._states.update(states)
    self._stats.update(stats)
    self._consumed_step += 1
    return batches

  @property
  def step(self) -> int:
    """The step the next batch returned by `next` is for."""
    return self._consumed_step

  def get_state(self) -> dict[str, Any]:
    """{name: iterator state} after the last consumed batch of each dataset: what a
    checkpoint saved now must hold to resume exactly."""
    return {n: dict(s) if isinstance(s, dict) else s for n, s in self._states.items()}

  def stats(self) -> dict[str, dict]:
    """{name: data counters} after the last consumed batch of each dataset (iterators
    with stats() only): what the steps trained on so far."""
    return {n: dict(s) for n, s in self._stats.items()}

  def close(self, timeout: float = 10.0) -> None:
    """Stops the producer and drops the batches made ahead. Idempotent. A producer
    stuck inside a slow `next()` is left to finish on its own (daemon thread)."""
    self._closed.set()
    if self._thread is None:
      return
    while True:  # free the slots so a producer blocked in put() sees the flag
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)
    if self._thread.is_alive():
      log.warning("prefetch producer still inside next() after %.0f s; leaving it "
                  "(daemon thread)", timeout)

  def __enter__(self) -> "Prefetcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self._closed.set()
    except AttributeError:  # constructor failed
      pass
