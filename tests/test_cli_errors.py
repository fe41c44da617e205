"""Bad input to a CLI gives one `error: ...` line naming the culprit and exit status 2.

Bugs keep their traceback, and FLAMINGO_JAX_TRACEBACK=1 or --traceback shows
the traceback of a user error too. Cheap cases call the CLI's main through
run_cli in this process; a few run the real `python -m ...` command.
"""
import os
import subprocess
import sys

import pytest

from flamingo_jax import errors
from flamingo_jax.data import convert, synthetic, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith("error: ")]


def assert_one_error(rc: int, stderr: str, *names: str) -> str:
  """Exit status 2, no traceback, exactly one `error:` line that names every `names`."""
  assert rc == errors.EXIT_USER_ERROR, stderr
  assert "Traceback" not in stderr, stderr
  lines = error_lines(stderr)
  assert len(lines) == 1, stderr
  for name in names:
    assert name in lines[0], (name, lines[0])
  return lines[0]


# ------------------------------------------------------------ the data tools


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  (d / "junk.tar").write_bytes(b"not a tar file" * 40)
  (d / "empty.txt").write_text("")
  (d / "corpus.txt").write_text("a red circle\na blue square\n" * 20)
  return d


DATA_CASES = {
    "convert: no shard matches": (
        convert.main, "--kind pairs --input {d}/nothing*.tar --out {d}/o",
        ["no tar shards match", "nothing*.tar"]),
    "convert: unknown kind": (
        convert.main, "--kind pairz --input {d}/junk.tar --out {d}/o",
        ["--kind", "'pairz'"]),
    "convert: missing --out": (convert.main, "--kind pairs --input {d}/junk.tar", ["--out"]),
    "convert: unreadable shard": (
        convert.main, "--kind pairs --input {d}/junk.tar --out {d}/o",
        ["no usable samples", "junk.tar", "shards/unreadable"]),
    "convert: records_per_file": (
        convert.main, "--kind pairs --input {d}/junk.tar --out {d}/o --records_per_file 0",
        ["records_per_file", "0"]),
    "train_tokenizer: missing input": (
        train_tokenizer.main, "--input {d}/missing.txt --vocab_size 64 --out {d}/tok",
        ["missing.txt", "not a file"]),
    "train_tokenizer: empty input": (
        train_tokenizer.main, "--input {d}/empty.txt --vocab_size 64 --out {d}/tok",
        ["empty.txt", "empty"]),
    "train_tokenizer: vocab_size": (
        train_tokenizer.main, "--input {d}/corpus.txt --vocab_size 4 --out {d}/tok",
        ["vocab_size", "4"]),
    "train_tokenizer: vocab_size type": (
        train_tokenizer.main, "--input {d}/corpus.txt --vocab_size many --out {d}/tok",
        ["--vocab_size", "'many'"]),
    "synthetic: image_size": (synthetic.main, "--out {d}/s --image_size 8", ["image_size", "8"]),
    "synthetic: no pairs": (
        synthetic.main, "--out {d}/s --num_pairs 0 5 --no_tokenizer", ["--num_pairs", "(0, 5)"]),
    "synthetic: out is a file": (
        synthetic.main, "--out {d}/corpus.txt --no_tokenizer", ["corpus.txt"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_tool_user_errors(case, files, capsys):
  main, argv, names = DATA_CASES[case]
  rc = errors.run_cli(main, argv.format(d=files).split())
  assert_one_error(rc, capsys.readouterr().err, *names)


def test_data_tool_command_line_and_tracebacks(files):
  """The real `python -m` command; the traceback only when asked for."""
  cmd = [sys.executable, "-m", "flamingo_jax.data.convert", "--kind", "pairs", "--input",
         f"{files}/nothing*.tar", "--out", f"{files}/o"]
  env = {k: v for k, v in os.environ.items() if k != errors.TRACEBACK_ENV}
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
  assert_one_error(r.returncode, r.stderr, "no tar shards match")
  for extra, extra_env in (["--traceback"], {}), ([], {errors.TRACEBACK_ENV: "1"}):
    r = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=REPO,
                       env={**env, **extra_env})
    assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr
    assert "no tar shards match" in r.stderr.splitlines()[-1]


def test_bugs_keep_their_traceback():
  def buggy(argv):
    return {}["no such key"]

  with pytest.raises(KeyError):
    errors.run_cli(buggy, [])


def test_argument_parser_errors_are_one_line(capsys):
  p = errors.ArgumentParser(prog="tool")
  p.add_argument("--n", type=int, required=True)
  sub = p.add_subparsers(dest="cmd")
  sub.add_parser("go").add_argument("--m", type=int)
  rc = errors.run_cli(lambda argv: p.parse_args(argv), ["--n", "x"])
  assert assert_one_error(rc, capsys.readouterr().err) == \
      "error: tool: argument --n: invalid int value: 'x' (see tool --help)"
  rc = errors.run_cli(lambda argv: p.parse_args(argv), ["--n", "1", "go", "--m", "y"])
  assert_one_error(rc, capsys.readouterr().err, "tool go: argument --m", "'y'")
