"""Bad weight files give the converters' one-line `error: ...` (exit status 2) naming
the file, the tensor and what is wrong: truncated downloads, bytes that are not a
safetensors file, torch files cut short, towers saved without the expected prefix."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flamingo_jax import errors
from flamingo_jax.convert import weights_io
from flamingo_jax.convert.__main__ import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "openflamingo_tiny")


def one_error(rc, stderr, *names):
  """Exit status 2, no traceback, exactly one `error:` line naming every `names`."""
  assert rc == errors.EXIT_USER_ERROR, stderr
  assert "Traceback" not in stderr, stderr
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, stderr
  for name in names:
    assert name in lines[0], (name, lines[0])
  return lines[0]


def truncate(path, fraction=0.5):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * fraction))
  return str(path)


@pytest.fixture
def files(tmp_path):
  """Copies of the fixture's base LM, checkpoint.pt and vision weights to damage."""
  shutil.copytree(os.path.join(FIXTURE, "lm"), tmp_path / "lm")
  for name in ("checkpoint.pt", "vision.safetensors"):
    shutil.copy(os.path.join(FIXTURE, name), tmp_path / name)
  return tmp_path


def openflamingo_argv(d, **over):
  args = {"input": d / "checkpoint.pt", "lm": d / "lm", "vision": d / "vision.safetensors",
          "cross_attn_every_n_layers": 2, "media_token_id": 101, "eoc_token_id": 100,
          "out": d / "out", **over}
  return ["openflamingo"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]


def first_tensor_after(path, fraction):
  """The name of the first tensor whose bytes end past `fraction` of the file."""
  header, offset, _ = weights_io._safetensors_header(path)
  cut = int(os.path.getsize(path) * fraction) - offset
  return min(((m["data_offsets"][0], k) for k, m in header.items()
              if k != "__metadata__" and m["data_offsets"][1] > cut))[1]


def test_half_truncated_lm_safetensors(files, capsys):
  path = str(files / "lm" / "model.safetensors")
  name = first_tensor_after(path, 0.5)
  truncate(path)
  rc = main(["hf-lm", "--input", str(files / "lm"), "--out", str(files / "o")])
  one_error(rc, capsys.readouterr().err, path, repr(name), "truncated")
  rc = main(openflamingo_argv(files))  # the same file as OpenFlamingo's base LM
  one_error(rc, capsys.readouterr().err, path, repr(name), "truncated")


def test_random_bytes_as_safetensors(files, capsys):
  """Its first 8 bytes read as a header size of petabytes: refused before allocating."""
  path = files / "lm" / "model.safetensors"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  rc = main(["hf-lm", "--input", str(files / "lm"), "--out", str(files / "o")])
  one_error(rc, capsys.readouterr().err, str(path), "not a safetensors file")
  path.write_bytes(b"<html>404 Not Found</html>")  # a saved error page
  rc = main(["hf-lm", "--input", str(files / "lm"), "--out", str(files / "o")])
  one_error(rc, capsys.readouterr().err, str(path), "not a safetensors file")
  path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(errors.CheckpointError, match="header is not JSON"):
    weights_io.read_safetensors(str(path))


def test_truncated_checkpoint_pt(files, capsys):
  path = truncate(files / "checkpoint.pt")
  rc = main(openflamingo_argv(files))
  one_error(rc, capsys.readouterr().err, path, "not a readable torch checkpoint", "truncated")
  (files / "checkpoint.pt").write_bytes(b"\x00" * 100)
  rc = main(openflamingo_argv(files))
  one_error(rc, capsys.readouterr().err, path, "not a readable torch checkpoint")


def test_truncated_vision_safetensors(files, capsys):
  path = str(files / "vision.safetensors")
  name = first_tensor_after(path, 0.7)
  truncate(path, 0.7)
  rc = main(openflamingo_argv(files))
  one_error(rc, capsys.readouterr().err, path, repr(name), "truncated")


def test_vision_weights_prefix(files, capsys):
  """A bare tower ("conv1.weight") converts like the "visual.*" state dict; any other
  prefix is named with the tensor that was expected."""
  from safetensors.numpy import load_file, save_file

  from flamingo_jax.convert.openflamingo import convert_openflamingo, load_torch_state_dict
  vision = load_file(str(files / "vision.safetensors"))
  checkpoint = load_torch_state_dict(str(files / "checkpoint.pt"))
  kw = dict(cross_attn_every_n_layers=2, media_token_id=101, eoc_token_id=100, vision_heads=4)
  _, want = convert_openflamingo(checkpoint, str(files / "lm"), vision, **kw)
  bare = {k.removeprefix("visual."): v for k, v in vision.items()}
  _, got = convert_openflamingo(checkpoint, str(files / "lm"), bare, **kw)
  for a, b in zip(*(sorted(_leaves(p["vision"])) for p in (want, got))):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
  path = files / "vision.safetensors"
  save_file({f"vision_encoder.{k}": v for k, v in vision.items()}, str(path))
  rc = main(openflamingo_argv(files))
  one_error(rc, capsys.readouterr().err, str(path), "'visual.conv1.weight'",
            "vision_encoder.visual.")


def _leaves(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", np.asarray(v)


def test_missing_tensor_names_the_file(files, capsys):
  import torch
  state = torch.load(files / "checkpoint.pt", weights_only=True)["model_state_dict"]
  del state["perceiver.layers.2.0.to_q.weight"]
  torch.save(state, files / "checkpoint.pt")
  rc = main(openflamingo_argv(files))
  one_error(rc, capsys.readouterr().err, str(files / "checkpoint.pt"),
            "'perceiver.layers.2.0.to_q.weight'", "(512, 32)")


def test_flags(files, capsys):
  argv = [a for a in openflamingo_argv(files) if a not in ("--media_token_id", "101")]
  one_error(main(argv), capsys.readouterr().err, "--media_token_id", "--tokenizer_dir")
  one_error(main(["openflamingo", "--lm", "x"]), capsys.readouterr().err, "--vision")
  one_error(main(openflamingo_argv(files, media_token_id=500)), capsys.readouterr().err,
            "media_token_id=500", "vocabulary of 103")


def test_timm_random_bytes(tmp_path, capsys):
  path = tmp_path / "nfnet.safetensors"
  path.write_bytes(np.random.default_rng(1).bytes(1000))
  rc = main(["nfnet", "--source", "timm", "--input", str(path), "--out", str(tmp_path / "o")])
  one_error(rc, capsys.readouterr().err, str(path), "not a safetensors file")


def test_command_line(files):
  """The real `python -m flamingo_jax.convert` exits 2 with the line on stderr."""
  path = truncate(files / "lm" / "model.safetensors")
  env = {k: v for k, v in os.environ.items() if k != errors.TRACEBACK_ENV}
  r = subprocess.run([sys.executable, "-m", "flamingo_jax.convert", "hf-lm", "--input",
                      str(files / "lm"), "--out", str(files / "o")],
                     capture_output=True, text=True, cwd=REPO, env=env)
  one_error(r.returncode, r.stderr, path, "truncated")


def test_tokenizer_flag(files, capsys):
  """--tokenizer_dir gives the ids (here the fixture's 100 / 101 from a 100-word tokenizer
  plus OpenFlamingo's tokens) and writes it; ids that disagree with it are named."""
  import json

  from tokenizers import Tokenizer, models, pre_tokenizers

  from flamingo_jax.data.tokenizer import Tokenizer as OurTokenizer
  words = ["<|endoftext|>"] + [f"w{i}" for i in range(99)]
  raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  (files / "tok").mkdir()
  raw.save(str(files / "tok" / "tokenizer.json"))
  argv = [a for a in openflamingo_argv(files) if a not in ("--media_token_id", "101",
                                                           "--eoc_token_id", "100")]
  assert main(argv + ["--tokenizer_dir", str(files / "tok")]) == 0
  tok = OurTokenizer.load(str(files / "out"))
  assert (tok.info.image_token_id, tok.info.eoc_token_id, tok.info.vocab_size) == (101, 100, 103)
  assert json.loads((files / "out" / "tokenizer_config.json").read_text())["pad_token"] == "<PAD>"
  assert not tok.add_bos and tok.encode("w3 w7") == [4, 8]
  rc = main(argv + ["--tokenizer_dir", str(files / "tok"), "--eoc_token_id", "99"])
  one_error(rc, capsys.readouterr().err, "--eoc_token_id=99", "<|endofchunk|> id 100")
  rc = main(argv + ["--tokenizer_dir", str(files / "missing")])
  one_error(rc, capsys.readouterr().err, "cannot read tokenizer", "missing")
