"""configs/from_hf_lm.py: a Flamingo around a `convert hf-lm` output. The vocabulary
grows by <image> / <EOC> with the LM's own tokenizer (or without one), the LM
checkpoint loads as converted, and the train CLI runs on it."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from flamingo_jax.config import load_config
from flamingo_jax.models.config import model_config  # noqa: E402
from flamingo_jax.convert.__main__ import main as convert_main  # noqa: E402
from flamingo_jax.errors import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "from_hf_lm.py")
V = 97


def save_tokenizer(directory, size: int):
  """A word-level tokenizer.json with `size` ids: <s>, </s>, then words."""
  words = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, size)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="</s>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def converted_llama(tmp_path, tokenizer_size=None):
  """A tiny random HF Llama (vocab 97), optionally with a tokenizer, through the CLI."""
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
  hf = tmp_path / "hf"
  ref.save_pretrained(hf, safe_serialization=True)
  if tokenizer_size:
    save_tokenizer(hf, tokenizer_size)
  out = tmp_path / "lm"
  assert convert_main(["hf-lm", "--input", str(hf), "--out", str(out)]) == 0
  return str(out)


@pytest.mark.parametrize("tokenizer_size, image, eoc, rows", [
    (V, V, V + 1, V),  # tokenizer = embedding rows (Llama 2): two ids appended
    (90, 90, 91, 0),  # embedding padded past the tokenizer (GPT-NeoX, MPT): ids inside
    (None, V, V + 1, V),  # no tokenizer: the two ids after the LM's rows
])
def test_vocabulary_grows_by_the_new_tokens(tmp_path, tokenizer_size, image, eoc, rows):
  from flamingo_jax.data.tokenizer import Tokenizer
  from flamingo_jax.model_dir import check_tokenizer
  lm_dir = converted_llama(tmp_path, tokenizer_size)
  assert os.path.isfile(os.path.join(lm_dir, "tokenizer.json")) == bool(tokenizer_size)
  config = load_config(CONFIG, f"{lm_dir},tiny")
  model = model_config(config)
  assert (model.image_token_id, model.eoc_token_id, model.lm.embedding_rows) == (image, eoc,
                                                                                rows)
  assert model.lm.vocab_size == max(V, eoc + 1) and model.lm.family == "llama"
  assert config.model_init.lm == os.path.join(lm_dir, "params")
  if tokenizer_size:
    assert config.data.tokenizer == os.path.join(lm_dir, "tokenizer.json")
    check_tokenizer(model, Tokenizer.load(lm_dir))


def test_config_errors_name_the_problem(tmp_path):
  with pytest.raises(ConfigError, match="needs the converted LM directory"):
    load_config(CONFIG)
  with pytest.raises(ConfigError, match="model_config.json' does not exist"):
    load_config(CONFIG, str(tmp_path))
  lm_dir = converted_llama(tmp_path)
  with pytest.raises(ConfigError, match="unknown option 'huge'"):
    load_config(CONFIG, f"{lm_dir},huge")
  save_tokenizer(lm_dir, V + 5)
  with pytest.raises(ConfigError, match="the tokenizer has 104 ids, more than the LM's 97"):
    load_config(CONFIG, lm_dir)


def test_embedding_rows_must_leave_only_the_new_tokens(tmp_path):
  config = load_config(CONFIG, f"{converted_llama(tmp_path)},tiny")
  config.model.lm.embedding_rows = V - 1
  with pytest.raises(ConfigError, match=r"the ids \[96, 97, 98\] past the LM's rows"):
    model_config(config)


@pytest.mark.slow
def test_train_cli_two_steps_on_a_converted_llama(tmp_path):
  """The documented command, 2 steps on synthetic data: the converted LM loads as the
  frozen LM (no resizing: <image> / <EOC> are past its 97 rows) and the loss is finite."""
  import re
  import subprocess
  import sys
  lm_dir = converted_llama(tmp_path, V)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, "-m", "flamingo_jax.train", "--config", f"{CONFIG}:{lm_dir},tiny",
       "--workdir", str(tmp_path / "run"), "--config.train.total_steps=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-3000:]
  assert f"frozen lm: loading {lm_dir}/params" in log
  losses = [float(x) for x in re.findall(r"step [12]/2 \| loss ([0-9.]+)", log)]
  assert len(losses) == 2 and all(np.isfinite(losses)), log[-2000:]
