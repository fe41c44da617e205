"""train.input='pipeline': the trainer on flamingo_jax.data's grain pipelines (the
embedded shapes dataset in its real tar format), resumed bit-exactly through
the pipelines' own iterator state."""
import json
import os
import shutil

import jax
import pytest

from flamingo_jax.trainers.flamingo import train
from flamingo_jax.config import apply_overrides, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pipeline_config(manifest, out, *overrides):
  """configs/tiny.py on the shapes world's tars (conftest.py's shapes_world)."""
  tok, datasets = manifest["tokenizer"], manifest["data"]["tar"]["train"]
  config = load_config(os.path.join(REPO, "configs", "tiny.py"))
  with config.unlocked():
    del config["synthetic"]
    config.train.input = "pipeline"
    config.data = {"tokenizer": os.path.join(out, "tokenizer", "tokenizer.model"),
                   "image": {"size": manifest["image_size"]},
                   "datasets": {"pairs": datasets["pairs"],
                                "interleaved": datasets["interleaved"]}}
  return apply_overrides(train.with_default_sections(config), [
      f"model.lm.vocab_size={tok['vocab_size']}",
      f"model.image_token_id={tok['image_token_id']}",
      f"model.eoc_token_id={tok['eoc_token_id']}",
      f"model.vision.image_size={manifest['image_size']}", "model.lm.num_layers=1",
      "train.total_steps=100", "train.log_every=1", "train.peak_flops_per_device=1e11",
      *overrides])


@pytest.mark.slow
def test_pipeline_input_trains_and_resumes_exactly(shapes_world, tmp_path):
  """Losses and the data counters logged at every step (data/<dataset>/examples_seen,
  examples_kept, dropped_image/*: those of the batches of steps 1..N, never the
  prefetcher's read-ahead) equal the uninterrupted run's after a stop with a checkpoint
  (SIGTERM, --stop_at) and after a kill -9 (resumed from an older periodic checkpoint)."""
  out, manifest = shapes_world
  config = pipeline_config(manifest, out, "checkpoint.every=2")
  one = jax.devices()[:1]
  straight = train.run(config, str(tmp_path / "a"), stop_at=5, devices=one)
  first = train.run(config, str(tmp_path / "b"), stop_at=3, devices=one)
  second = train.run(config, str(tmp_path / "b"), stop_at=5, devices=one)
  keys = ("loss", "loss/pairs", "loss/interleaved", "grad_norm")
  pick = lambda rows: [[r[k] for k in keys] for r in rows]  # noqa: E731
  assert pick(first["history"] + second["history"]) == pick(straight["history"])
  counters = sorted(k for k in straight["history"][0] if k.startswith("data/"))
  assert {"data/pairs/examples_seen", "data/pairs/examples_kept",
          "data/interleaved/examples_kept"} <= set(counters)
  data = lambda rows: [[r[k] for k in counters] for r in rows]  # noqa: E731
  assert data(first["history"] + second["history"]) == data(straight["history"])
  for name in ("pairs", "interleaved"):  # each step's batch, kept examples only
    size = config.data.datasets[name].batch_size
    assert [r[f"data/{name}/examples_kept"] for r in straight["history"]] == \
        [size * n for n in range(1, 6)]
  state = json.load(open(tmp_path / "b" / "checkpoints" / "4" / "data" /
                         "process_0-of-1.json"))
  assert set(state) == {"pairs", "interleaved"}
  # kill -9 after step 5, before its save: the newest checkpoint is 4; steps 5.. replayed.
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "5")
  third = train.run(config, str(tmp_path / "b"), stop_at=5, devices=one)
  assert data(third["history"]) == data(straight["history"][4:])
  assert pick(third["history"]) == pick(straight["history"][4:])


def _never_compile(monkeypatch):
  """Every check below must fail before the step compiles (in seconds)."""
  def compile_step(*args, **kwargs):
    raise AssertionError("the step compiled before the mismatch was reported")
  monkeypatch.setattr(train.state_lib, "compile_step", compile_step)


def test_mismatches_fail_before_compiling(shapes_world, tmp_path, monkeypatch):
  from flamingo_jax.errors import CheckpointError, DataError
  from flamingo_jax.runtime.params_io import save_params
  out, manifest = shapes_world
  tok = manifest["tokenizer"]
  _never_compile(monkeypatch)
  one = jax.devices()[:1]
  wrong_image = tok["eoc_token_id"] - 2
  cases = [
      ([f"model.image_token_id={wrong_image}"], DataError,
       rf"data.tokenizer .*tokenizer.model vs the model config: the tokenizer's <image> id is "
       rf"{tok['image_token_id']} but model.image_token_id is {wrong_image}"),
      ([f"model.lm.vocab_size={tok['vocab_size'] + 8}", f"model.eoc_token_id={tok['vocab_size']}"],
       DataError, rf"<EOC> id is {tok['eoc_token_id']} but model.eoc_token_id is "
       rf"{tok['vocab_size']}"),
      (["data.tokenizer='/nowhere/tokenizer.model'"], DataError,
       r"config key 'data.tokenizer': .*/nowhere/tokenizer.model"),
      (["data.datasets.pairs.paths=['/nowhere/pairs-*.tar']"], DataError,
       r"data\.datasets\.pairs.*/nowhere/pairs-\*\.tar"),
  ]
  for overrides, error, pattern in cases:
    with pytest.raises(error, match=pattern):
      train.run(pipeline_config(manifest, out, *overrides), str(tmp_path / "run"), devices=one)
  save_params(str(tmp_path / "lm"), {"embed": jax.numpy.zeros((3, 2))}, {"component": "lm"})
  with pytest.raises(CheckpointError, match=r"model_init / frozen weights of 'lm' "
                     r"\(model_init\.lm\): .* tensors missing from .*/lm"):
    train.run(pipeline_config(manifest, out, f"model_init={{'lm': '{tmp_path}/lm'}}"),
              str(tmp_path / "run2"), devices=one)
