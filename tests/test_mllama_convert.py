"""`python -m flamingo_jax.convert mllama` on directories transformers writes: a
`save_pretrained` of the tiny random MllamaForConditionalGeneration (sharded
safetensors with their index, transformers >= 4.52's `model.language_model.*`
keys) and the same tensors in the hub's layout (`language_model.model.*`, one
file) give model directories whose logits equal transformers'; the tokenizer is
copied; a missing or unexpected tensor is one error line naming it (status 2)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_mllama_text_parity import V, batch, diff, hf_logits, hf_model, ours  # noqa: E402

from flamingo_jax.convert import weights_io  # noqa: E402
from flamingo_jax.convert.__main__ import main  # noqa: E402
from flamingo_jax.model_dir import read_model_config  # noqa: E402

TOL = 1e-4


def hub_layout(src, dst):
  """The hub's names (language_model.model.*, vision_model.*, ...) in one file."""
  from safetensors.numpy import save_file
  os.makedirs(dst)
  renames = (("model.language_model.", "language_model.model."),
             ("lm_head.", "language_model.lm_head."),
             ("model.", ""))
  out = {}
  for name, value in weights_io.load_hf_weights_dir(src).items():
    for new, old in renames:
      if name.startswith(new):
        name = old + name[len(new):]
        break
    out[name] = np.ascontiguousarray(value)
  save_file(out, os.path.join(dst, "model.safetensors"))
  shutil.copy(os.path.join(src, "config.json"), dst)
  return out


def tiny_tokenizer(path):
  from tokenizers import Tokenizer, models
  vocab = {f"t{i}": i for i in range(V)}
  Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(os.path.join(path, "tokenizer.json"))


def restore(out):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    return read_model_config(str(out)), ckptr.restore(os.path.join(str(out), "params"))


def test_convert_cli_both_layouts(tmp_path, capsys):
  model = hf_model()
  new = tmp_path / "new"
  model.save_pretrained(new, max_shard_size="40KB")
  assert os.path.isfile(new / "model.safetensors.index.json")
  shards = set(json.load(open(new / "model.safetensors.index.json"))["weight_map"].values())
  assert len(shards) > 1
  tiny_tokenizer(new)
  hub = hub_layout(new, tmp_path / "hub")
  assert "language_model.model.embed_tokens.weight" in hub
  assert "multi_modal_projector.weight" in hub

  ids, mask, features, tiles = batch()
  want = hf_logits(ids, mask, features, tiles)
  for src in (new, tmp_path / "hub"):
    out = tmp_path / f"out_{src.name}"
    assert main(["mllama", "--input", str(src), "--out", str(out)]) == 0
    config, params = restore(out)
    err = diff(ours(config, params, ids, mask, features, tiles), want, mask)
    print(f"mllama CLI parity ({src.name} layout): max abs logit diff {err:.2e}")
    assert err < TOL
  assert os.path.isfile(tmp_path / "out_new" / "tokenizer.json")
  meta = tmp_path / "out_meta"
  assert main(["mllama", "--input", str(new), "--out", str(meta), "--row_mask", "meta"]) == 0
  assert read_model_config(str(meta)).xattn.no_image == "skip"

  # a missing tensor, an unexpected one: one line naming it, status 2
  from safetensors.numpy import save_file
  bad = tmp_path / "bad"
  os.makedirs(bad)
  shutil.copy(new / "config.json", bad)
  broken = dict(hub)
  del broken["language_model.model.layers.6.cross_attn.q_norm.weight"]
  save_file(broken, str(bad / "model.safetensors"))
  capsys.readouterr()
  assert main(["mllama", "--input", str(bad), "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "\n" not in err
  assert "language_model.model.layers.6.cross_attn.q_norm.weight" in err
  save_file(dict(hub, **{"language_model.model.layers.2.mlp.extra": np.zeros(2, np.float32)}),
            str(bad / "model.safetensors"))
  assert main(["mllama", "--input", str(bad), "--out", str(tmp_path / "y")]) == 2
  err = capsys.readouterr().err.strip()
  assert "language_model.model.layers.2.mlp.extra" in err and "\n" not in err
  assert jax.tree.leaves(params)  # the restored tree is not empty
