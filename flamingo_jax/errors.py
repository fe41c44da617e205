"""User errors and the one-line `error: ...` contract shared by every CLI.

A user error (a bad config key or type, a missing file, a token id or tensor
shape that disagrees with the model) is printed as one line, `error: <what,
naming the key / file / tensor>`, and the process exits with status 2. Anything
else is a bug and keeps its traceback. Set FLAMINGO_JAX_TRACEBACK=1 (or pass
`--traceback` to any CLI) to see the traceback of a user error too.

Raise `UserError` (or a subclass) for bad input. `ValueError` and the path
errors (`FileNotFoundError`, `FileExistsError`, `NotADirectoryError`,
`IsADirectoryError`, `PermissionError`) are treated as user errors as well,
since the config, converter and data code has always raised them for bad
input. `ArgumentParser` makes argparse usage errors one line too.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any, Callable, Optional, Sequence

TRACEBACK_ENV = "FLAMINGO_JAX_TRACEBACK"
EXIT_USER_ERROR = 2

# Exception types whose message is the whole story for the user.
USER_ERROR_TYPES: tuple = ()  # filled below, after the classes exist


class UserError(ValueError):
  """Bad input from the user; the message names the key, file, tensor or token."""


class ConfigError(UserError):
  """A config key that is unknown, of the wrong type, or inconsistent with another."""


class CheckpointError(UserError):
  """A checkpoint or weights file that is missing, truncated or does not fit the config."""


class DataError(UserError):
  """A data source, shard or tokenizer that cannot be opened or disagrees with the model."""


class MissingExtraError(UserError):
  """An optional dependency that a feature needs is not installed (setup.py's extras)."""


def require_extra(modules: Sequence[str], extra: str, what: str) -> None:
  """MissingExtraError, one line naming the pip extra, unless every module is importable."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    raise MissingExtraError(f"{what} needs {' and '.join(missing)}, not installed: "
                            f"pip install 'flamingo_jax[{extra}]'")


# URI schemes that need an optional filesystem package (etils.epath / fsspec), and its extra.
REMOTE_SCHEMES = {"gs://": ("gcsfs", "gcs")}


def require_remote_support(path: str, what: str) -> None:
  """MissingExtraError naming the extra when `path` is a URI whose filesystem package is
  missing (epath would fail later with a long traceback)."""
  for scheme, (module, extra) in REMOTE_SCHEMES.items():
    if str(path).startswith(scheme):
      require_extra((module,), extra, f"{what} {path}")


class Interrupted(Exception):
  """A run stopped by a signal after saving what it had (a checkpoint): not an error and not
  a bug. run_cli prints `interrupted: <message>` (what was saved, how to resume) and exits
  with the shell's status for the signal, 128 + signum (SIGINT 130, SIGTERM 143)."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
USER_ERROR_TYPES = (UserError, ValueError) + _PATH_ERRORS


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are UserErrors: one `error: ...` line, exit 2.

  (argparse's own error() prints the whole usage block first.) `--help` is
  unchanged. Sub-parsers made with add_subparsers() inherit this class. The
  default prog is `python -m <module>` when run with -m (argparse would say
  `train.py` or `__main__.py`).
  """

  def __init__(self, *args, **kwargs):
    if not args and kwargs.get("prog") is None:
      spec = getattr(sys.modules.get("__main__"), "__spec__", None)
      if spec is not None and spec.name:
        kwargs["prog"] = f"python -m {spec.name.removesuffix('.__main__')}"
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")

  def add_renamed(self, old: str, new: str, **kwargs) -> None:
    """`old`, a flag renamed to `new` (already added; `kwargs` as its type): still accepted
    for a release, with a one-line note on stderr; hidden from --help."""
    dest = new.lstrip("-").replace("-", "_")
    self.add_argument(old, dest=dest, action=_Renamed, new=new, help=argparse.SUPPRESS,
                      default=argparse.SUPPRESS, **kwargs)


class _Renamed(argparse.Action):
  """Stores like the new flag and says, once per use, that the old name is going."""

  def __init__(self, option_strings, dest, new: str = "", **kwargs):
    super().__init__(option_strings, dest, **kwargs)
    self.new = new

  def __call__(self, parser, namespace, values, option_string=None):
    print(f"note: {option_string} is renamed {self.new}; the old name goes in the next "
          "release", file=sys.stderr, flush=True)
    setattr(namespace, self.dest, values)


def show_tracebacks(argv: Optional[Sequence[str]] = None) -> bool:
  """True if the user asked for tracebacks of user errors (env var or --traceback)."""
  if os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    return True
  args = sys.argv[1:] if argv is None else argv
  return "--traceback" in args


def strip_traceback_flag(argv: Optional[Sequence[str]]) -> Optional[list]:
  """argv without `--traceback` (so argparse never sees it); None stays None."""
  if argv is None:
    argv = sys.argv[1:]
  return [a for a in argv if a != "--traceback"]


def one_line(exc: BaseException) -> str:
  """The exception's message on one line (newlines folded, type named if empty)."""
  if isinstance(exc, _PATH_ERRORS) and exc.filename and exc.strerror:
    msg = f"{exc.strerror}: {exc.filename}"
  else:
    msg = str(exc)
    if isinstance(exc, KeyError) and exc.args:
      msg = str(exc.args[0])
  msg = " ".join(msg.split())
  return msg or type(exc).__name__


def brief(exc: BaseException, limit: int = 100) -> str:
  """one_line(exc) for a line that must stay short (a damaged checkpoint's cause): JSON
  specs that TensorStore puts into its messages (often 2,000 characters) become `{...}`,
  and the rest is cut to `limit` characters."""
  msg, out, depth = one_line(exc), [], 0
  for ch in msg:
    if ch == "{":
      depth += 1
      if depth == 1:
        out.append("{...}")
    elif ch == "}" and depth:
      depth -= 1
    elif not depth:
      out.append(ch)
  msg = " ".join("".join(out).split())
  return msg if len(msg) <= limit else msg[:limit - 3].rstrip() + "..."


CORRUPT_LINE_LIMIT = 190


def corrupt_line(path: str, name: str, cause: str, step: Optional[int] = None,
                 kind: str = "array") -> str:
  """`checkpoint STEP at PATH: array NAME: CAUSE`: how every reader of a checkpoint or
  model directory names damage (kind 'file' for a file that is not an array's data)."""
  where = f"checkpoint {step} at {path}" if step is not None else f"checkpoint at {path}"
  head = f"{where}: {kind} {name}: "
  room = max(CORRUPT_LINE_LIMIT - len(head), 40)  # `error: ` + the line: < 200 characters
  return head + (cause if len(cause) <= room else cause[:room - 3].rstrip() + "...")


def _flush_logs() -> None:
  """Flush (not close: run_cli also runs in-process, e.g. in tests) every log handler,
  so that buffered log lines come before the error line."""
  for ref in list(logging._handlerList):  # pylint: disable=protected-access
    handler = ref()
    if handler is not None:
      try:
        handler.flush()
      except (OSError, ValueError):
        pass


def report(exc: BaseException) -> int:
  """Print `error: ...` for a user error to stderr and return the exit status."""
  _flush_logs()
  print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


_EXITING = threading.Lock()  # the signal handler and the watcher thread: one line, one exit


def _interrupt_now(*_) -> None:
  if not _EXITING.acquire(blocking=False):
    return  # the other one is exiting
  _flush_logs()
  print("error: interrupted", file=sys.stderr, flush=True)
  os._exit(130)  # pylint: disable=protected-access


def exit_on_interrupt() -> None:
  """For a process that is the program: the first Ctrl-C ends it at once with one line and
  status 130. A raised KeyboardInterrupt can be lost (in a gc callback, where Python only
  prints it) or wait for a compilation or a worker thread; the handler exits instead, and a
  watcher thread woken through signal.set_wakeup_fd exits while the main thread is busy in
  native code. A trainer's loop puts its own handler in place (training/loop.py
  StopSignal: checkpoint, then exit) and restores this one after."""
  import signal  # pylint: disable=import-outside-toplevel
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    return  # ignored (a background job) or someone else's handler
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.signal(signal.SIGINT, _interrupt_now)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

  def watch():
    while True:
      if signal.SIGINT in os.read(read_fd, 64) and signal.getsignal(
          signal.SIGINT) is _interrupt_now:
        _interrupt_now()

  threading.Thread(target=watch, name="exit_on_interrupt", daemon=True).start()


def run_cli(main: Callable[[Optional[Sequence[str]]], Any],
            argv: Optional[Sequence[str]] = None) -> int:
  """Run `main(argv)` with the one-line error contract; returns the exit status.

  Use as `sys.exit(run_cli(main))` under `if __name__ == "__main__":`. A `main`
  that returns an int uses it as the exit status; None means 0. With argv None this
  process is the program, so it first keeps XLA's freed CPU memory mapped
  (flamingo_jax/host_memory.py) and makes Ctrl-C end it at once (exit_on_interrupt);
  in-process callers (tests) pass argv and are left alone. A run stopped by a signal
  after saving (Interrupted) prints `interrupted: ...` and exits 128 + signum.
  """
  if argv is None:
    from flamingo_jax.process import host_memory  # pylint: disable=import-outside-toplevel
    host_memory.keep_freed_memory()
    exit_on_interrupt()
  traceback = show_tracebacks(argv)
  program = argv is None
  try:
    result = main(strip_traceback_flag(argv))
  except Interrupted as exc:
    _flush_logs()
    print(f"interrupted: {one_line(exc)}", file=sys.stderr, flush=True)
    return 128 + exc.signum
  except USER_ERROR_TYPES as exc:
    if traceback:
      raise
    return report(exc)
  except KeyboardInterrupt:
    _flush_logs()
    print("error: interrupted", file=sys.stderr, flush=True)
    if program:  # leave now: not after a worker thread finishes
      sys.stdout.flush()
      os._exit(130)  # pylint: disable=protected-access
    return 130
  return result if isinstance(result, int) else 0
