"""configs/mllama_{11b,90b}.py have exactly the parameters of transformers'
MllamaForConditionalGeneration built from the same hub shapes (on the meta device:
nothing allocated), per component too; counted here without allocation."""
import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flamingo_jax.apps.count_params import count_params  # noqa: E402
from flamingo_jax.config import load_config  # noqa: E402
from flamingo_jax.models.config import model_config  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
_spec = importlib.util.spec_from_file_location("mllama_shapes",
                                               os.path.join(CONFIGS, "mllama_shapes.py"))
mllama_shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mllama_shapes)


def hf_counts(size):
  from transformers import MllamaConfig, MllamaForConditionalGeneration
  hf = mllama_shapes.hf_config(size)
  with torch.device("meta"):
    model = MllamaForConditionalGeneration(MllamaConfig(
        text_config=hf["text_config"], vision_config=hf["vision_config"],
        image_token_index=hf["image_token_index"]))
  counts = {"total": 0, "vision": 0, "projector": 0}
  for name, p in model.named_parameters():
    counts["total"] += p.numel()
    counts["vision"] += p.numel() if ".vision_model." in f".{name}" else 0
    counts["projector"] += p.numel() if "multi_modal_projector" in name else 0
  return counts


@pytest.mark.parametrize("size", ["11b", pytest.param("90b", marks=pytest.mark.slow)])
def test_param_counts_equal_transformers(size):
  want = hf_counts(size)
  config = model_config(load_config(os.path.join(CONFIGS, f"mllama_{size}.py")))
  assert config.xattn.no_image == "attend_all" and config.scan_layers
  got = count_params(config)
  print(f"mllama {size}: {got['total']:,} parameters (transformers: {want['total']:,})")
  assert got["total"] == want["total"]
  assert got["vision"] == want["vision"] and got["resampler"] == want["projector"]
  assert got["new_tokens"] == 8 * config.lm.width
  assert got["trainable"] == got["total"] - got["vision"] - got["lm"]


def test_row_mask_argument():
  config = model_config(load_config(os.path.join(CONFIGS, "mllama_11b.py"), "meta"))
  assert config.xattn.no_image == "skip" and config.xattn.layers == tuple(range(3, 32, 4))
