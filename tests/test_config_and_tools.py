"""Config files, command-line overrides and count_params."""
import json
import os
import subprocess
import sys

import pytest

from flamingo_jax.config import model_config, paper_model
from flamingo_jax.config import apply_overrides, load_config
from flamingo_jax.tools.count_params import count_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(name):
  return load_config(os.path.join(REPO, "configs", name))


def test_overrides_apply_and_reject_unknown_keys():
  c = apply_overrides(cfg("tiny.py"), ["--config.model.xattn.every=2",
                                       "model.xattn.gating=none", "model.frozen=['vision']"])
  m = model_config(c)
  assert m.xattn.every == 2 and m.xattn.gating == "none" and m.frozen == ("vision",)
  with pytest.raises(ValueError, match="unknown config key 'model.xattn.evry'"):
    apply_overrides(cfg("tiny.py"), ["model.xattn.evry=2"])
  with pytest.raises(ValueError, match="unknown config key 'model.xatn'"):
    apply_overrides(cfg("tiny.py"), ["model.xatn.every=2"])
  with pytest.raises(ValueError, match="does not exist"):
    load_config("configs/nope.py")


def test_overrides_leave_the_original_alone():
  base = cfg("tiny.py")
  apply_overrides(base, ["model.xattn.every=3"])
  assert base.model.xattn.every == 1


def test_config_argument_may_be_a_path(tmp_path):
  (tmp_path / "model_config.json").write_text('{"lm": {"num_layers": 3}}')
  c = load_config(os.path.join(REPO, "configs", "from_checkpoint.py") + ":" + str(tmp_path))
  assert c.model.lm.num_layers == 3


@pytest.mark.parametrize("size,lm,xattn", [
    ("3b", 1_273_700_352, 1_157_898_288),
    ("9b", 8_184_807_424, 1_803_745_300),
    ("80b", 64_689_307_648, 8_355_483_672),
])
def test_paper_counts_without_vision(size, lm, xattn):
  counts = count_params(paper_model(size), with_vision=False)
  assert counts["lm"] == lm
  assert counts["xattn"] == xattn
  assert counts["resampler"] == 174_769_152
  assert counts["trainable"] == counts["total"] - counts["frozen"]
  assert counts["frozen"] == lm  # no vision encoder in this count


def test_paper_v1_head_size():
  v1 = count_params(paper_model("3b", "v1"), with_vision=False)
  v2 = count_params(paper_model("3b", "v2"), with_vision=False)
  assert v1["resampler"] > v2["resampler"]  # 16 x 128 heads instead of 16 x 96


def test_count_params_cli_json():
  out = subprocess.run([sys.executable, "-m", "flamingo_jax.tools.count_params", "--config",
                        os.path.join(REPO, "configs", "tiny.py"), "--json"],
                       capture_output=True, text=True, check=True, cwd=REPO)
  counts = json.loads(out.stdout)
  assert set(counts) >= {"vision", "resampler", "xattn", "lm", "total", "trainable"}
  assert counts["total"] == sum(counts[k] for k in ("vision", "resampler", "xattn", "lm",
                                                    "new_tokens"))


def test_paper_3b_with_nfnet_f6_vision():
  counts = count_params(paper_model("3b"))
  assert counts["vision"] == 435_286_116  # timm dm_nfnet_f6 without its 1000-class head
  assert counts["frozen"] == counts["vision"] + counts["lm"]
