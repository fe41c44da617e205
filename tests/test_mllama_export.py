"""`python -m flamingo_jax.convert mllama-export`: a model directory of a converted and
then changed ("fine-tuned") tiny mllama, in either layer layout, written back to
transformers' layout, loads in MllamaForConditionalGeneration.from_pretrained with
the logits our model computes (images, padded tiles, groups, a text-only row);
`convert mllama` of the export gives back the same parameters; a config without
mllama's structure and a --hf_config of other shapes are one error line."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_mllama_model import images, our_inputs  # noqa: E402
from test_mllama_text_parity import V, batch, converted, cross_mask, diff, hf_model  # noqa: E402

from flamingo_jax.config import to_config_dict  # noqa: E402
from flamingo_jax.convert.__main__ import main  # noqa: E402
from flamingo_jax.convert.mllama import load_mllama  # noqa: E402
from flamingo_jax.convert.mllama_export import check_structure  # noqa: E402
from flamingo_jax.errors import ConfigError  # noqa: E402
from flamingo_jax.model_dir import write_model_dir  # noqa: E402
from flamingo_jax.models import layer_stack  # noqa: E402
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402

TOL = 1e-4


def fine_tuned():
  """The converted params with every leaf moved (a stand-in for training)."""
  config, params = converted()
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(7)
  moved = [np.asarray(x) + 0.05 * rng.normal(size=np.shape(x)).astype(np.float32)
           for x in leaves]
  return config, jax.tree.unflatten(tree, moved)


def transformers_logits(directory, ids, mask, tiles):
  from transformers import MllamaForConditionalGeneration
  model = MllamaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
  pixels, ar_ids, ar_mask = images(tiles)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(positions), pixel_values=torch.from_numpy(pixels),
                 aspect_ratio_ids=torch.from_numpy(ar_ids),
                 aspect_ratio_mask=torch.from_numpy(ar_mask),
                 cross_attention_mask=torch.from_numpy(cross_mask(ids, tiles)),
                 use_cache=False).logits.numpy()


@pytest.mark.slow
def test_export_loads_in_transformers_with_equal_logits(tmp_path, capsys):
  config, params = fine_tuned()
  ids, mask, _, tiles = batch()
  logits, _ = jax.jit(Flamingo(config).apply)({"params": params}, ids, attention_mask=mask,
                                               **our_inputs(tiles))
  ours = np.asarray(logits)
  scanned = dataclasses.replace(config, scan_layers=True)
  for name, cfg, tree, shard in (("unrolled", config, params, "1"),
                                 ("scanned", scanned, layer_stack.to_layout(params, scanned),
                                  "0.00003")):
    model_dir = tmp_path / f"model_{name}"
    write_model_dir(str(model_dir), tree, to_config_dict(cfg).to_dict())
    out = tmp_path / f"hf_{name}"
    assert main(["mllama-export", "--input", str(model_dir), "--out", str(out),
                 "--max_shard_gb", shard]) == 0
    assert os.path.isfile(out / "model.safetensors.index.json") == (name == "scanned")
    err = diff(ours, transformers_logits(str(out), ids, mask, tiles), mask)
    print(f"mllama export ({name} layout): transformers' logits differ by {err:.2e}")
    assert err < TOL
  # back again: the same parameters
  config2, params2 = load_mllama(str(tmp_path / "hf_unrolled"))
  assert config2 == config
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                   params, params2))
  # --hf_config: the original config.json's other fields kept; other shapes refused
  original = tmp_path / "original"
  hf_model().save_pretrained(original)
  assert main(["mllama-export", "--input", str(tmp_path / "model_unrolled"), "--out",
               str(tmp_path / "hf_t"), "--hf_config", str(original / "config.json")]) == 0
  written = json.load(open(tmp_path / "hf_t" / "config.json"))
  assert written["text_config"]["pad_token_id"] == hf_model().config.text_config.pad_token_id
  bad = json.load(open(original / "config.json"))
  bad["text_config"]["intermediate_size"] = 50
  json.dump(bad, open(tmp_path / "bad.json", "w"))
  capsys.readouterr()
  assert main(["mllama-export", "--input", str(tmp_path / "model_unrolled"), "--out",
               str(tmp_path / "hf_bad"), "--hf_config", str(tmp_path / "bad.json")]) == 2
  err = capsys.readouterr().err.strip()
  assert "text_config.intermediate_size" in err and "\n" not in err
  assert (ours[..., V:] == np.finfo(np.float32).min).all()


def test_structure_errors_name_the_key():
  config, _ = converted()
  with pytest.raises(ConfigError, match="'model.xattn.qk_norm'"):
    check_structure(dataclasses.replace(config, xattn=dataclasses.replace(config.xattn,
                                                                          qk_norm=False)))
  with pytest.raises(ConfigError, match="'model.xattn.no_image'"):
    check_structure(dataclasses.replace(config, xattn=dataclasses.replace(
        config.xattn, no_image="zero_output")))
