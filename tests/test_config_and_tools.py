"""Config files, command-line overrides and count_params."""
import json
import os
import subprocess
import sys

import pytest

from flamingo_jax.models.config import model_config, paper_model
from flamingo_jax.config import apply_overrides, load_config
from flamingo_jax.apps.count_params import count_params

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


def test_every_trainer_overrides_the_same_way(tmp_path):
  """Defaults exist before overrides in every trainer; dotted overrides add keys to
  dict-valued fields; a typo anywhere (synthetic included) and a type error name the
  whole key path; all are ConfigErrors (one `error:` line from the CLIs)."""
  from flamingo_jax.trainers.contrastive import train as contrastive
  from flamingo_jax.trainers.lm import train as lm_pretrain
  from flamingo_jax.trainers.flamingo import train
  from flamingo_jax.errors import ConfigError
  from flamingo_jax.training import cli
  tiny = os.path.join(REPO, "configs", "tiny.py")
  def flamingo(*overrides):
    return cli.load(tiny, overrides, train.with_default_sections, train.OPEN_KEYS)
  c = flamingo("--config.model_init.lm=/ckpt/lm", "--config.train.micro_batches.pairs=2")
  s = train.setup(c)
  assert s.model_init == {"lm": "/ckpt/lm"} and s.train.micro_batches == {"pairs": 2}
  spec = os.path.join(REPO, "configs", "contrastive_tiny.py") + f":data={tmp_path}"
  c = contrastive.load(spec, ["--config.checkpoint.enabled=False",
                              "--config.model_init.vision=/ckpt/v", "--config.mesh.tensor=2"])
  assert (c.checkpoint.enabled, dict(c.model_init), c.mesh.tensor) == (
      False, {"vision": "/ckpt/v"}, 2)
  lm_spec = os.path.join(REPO, "configs", "lm_pretrain_demo.py") + f":{tmp_path}"
  lm = lm_pretrain.load(lm_spec, ["--config.checkpoint.on_corrupt=refuse"])
  assert lm.checkpoint.on_corrupt == "refuse"
  for override, key in [("--config.synthetic.seeed=1", "'synthetic.seeed'"),
                        ("--config.optim.learning_rate=abc", "'optim.learning_rate' must be float"),
                        ("--config.checkpoint.on_corupt=refuse", "'checkpoint.on_corupt'")]:
    with pytest.raises(ConfigError, match=key):
      flamingo(override)
  with pytest.raises(ConfigError, match="'synthetic.datasets.pairs.wieght'"):
    train.setup(apply_overrides(cfg("tiny.py"), ["synthetic.datasets.pairs={'wieght': 1.0}"]))
  with pytest.raises(ConfigError, match=r"'model\.text\.embed_dimm'"):
    contrastive.load(spec, ["--config.model.text.embed_dimm=3"])
  with pytest.raises(ConfigError, match="'checkpoint.on_corrupt' is 'maybe'"):
    train.setup(flamingo("--config.checkpoint.on_corrupt=maybe"))
