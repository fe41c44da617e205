"""`make demo` at smoke scale: every stage runs, resumes and skips, and the trained model
beats its gates-zero baseline; every ablation config validates; one ablation trains and
lands in the Table 3 layout."""
import dataclasses
import json
import os

import numpy as np
import pytest

from flamingo_jax.apps import ablations
from flamingo_jax.apps.demo import report as demo_report
from flamingo_jax.apps.demo import stages as demo
from flamingo_jax.trainers.flamingo import train
from flamingo_jax.models.config import model_config


@pytest.mark.slow
def test_demo_runs_every_stage_skips_finished_ones_and_runs_an_ablation(tmp_path):
  workdir = str(tmp_path)
  results = demo.run(workdir, demo.SCALES["smoke"])
  assert set(results) == set(demo.STAGES)
  for name in ("report.md", "loss.png", "gates.png", "shots.png", "model/params",
               "model/model_config.json", "model/tokenizer.model"):
    assert os.path.exists(os.path.join(workdir, name)), name
  ev = results["eval"]
  assert set(ev["results"]) == {"flamingo", "gates_zero"}
  assert set(ev["chance"]) == {"captions", "vqa", "classes"}
  for scores in ev["results"]["flamingo"].values():
    assert set(scores) == {"0", "2"}
  names = ev["names"]
  assert set(names["results"]) == {"flamingo", "gates_zero"}
  assert set(names["results"]["flamingo"]) == {"0", "2"} and 33 < names["chance"] < 34
  # 40 updates on the smoke world already beat the frozen LM alone (the same weights with
  # every gate at 0): the cross-attention learned something, not only the plumbing ran.
  trained, alone = ev["results"]["flamingo"], ev["results"]["gates_zero"]
  assert sum(trained["captions"].values()) > sum(alone["captions"].values()) + 5.0, ev
  report = open(os.path.join(workdir, "report.md")).read()
  assert "| captions | CIDEr | gates_zero |" in report and "chance" in report
  assert "| names | top-1 | flamingo |" in report and "| names | top-1 | chance | 33.3" in report
  assert "Total wall time:" in report and "| total |" in report
  # The --seeds report: a second seed's table and time join the first's.
  paths = demo.demo_paths(workdir)
  seconds = {s: results[s]["_seconds"] for s in demo.STAGES[:-1]}
  shifted = json.loads(json.dumps(ev))
  shifted["results"]["flamingo"]["classes"]["0"] += 10.0
  demo_report.write_report(paths, results, seconds, seeds={
      0: (ev, {"flamingo": 1.0, "eval": 2.0}), 1: (shifted, {"flamingo": 100.0, "eval": 20.0})})
  report = open(os.path.join(workdir, "report.md")).read()
  c0 = ev["results"]["flamingo"]["classes"]["0"]
  assert "## Seeds" in report and "over 2 seeds (0, 1)" in report
  assert "![shots_seeds.png](shots_seeds.png)" in report
  assert os.path.getsize(os.path.join(workdir, "shots_seeds.png")) > 10_000
  assert f"| classes | top-1 | flamingo | {c0 + 5:.1f} [{c0:.1f}, {c0 + 10:.1f}] |" in report
  shared = sum(seconds[s] for s in ("data", "lm", "vision"))
  assert f"| total | wall time of the stages above, end to end | {shared + 123:.0f} |" in report
  # The LM and the vision tower the Flamingo stage loaded are the pretrained ones.
  config = json.load(open(os.path.join(workdir, "flamingo", "config.json")))
  assert config["model_init"]["lm"].endswith("lm/export/lm")
  # A second run skips every finished stage (no trainer runs: seconds, not minutes).
  again = demo.run(workdir, demo.SCALES["smoke"])
  assert again["flamingo"] == results["flamingo"] and again["eval"] == results["eval"]
  with pytest.raises(ValueError, match="was made with --scale smoke, not demo"):
    demo.run(workdir, demo.SCALES["demo"], stages=("data",))

  # One ablation on the same workdir (one test: xdist would build the fixture twice).
  scale = demo.SCALES["smoke"]
  path = os.path.join(ablations.ABLATION_DIR, "no_tanh_gating.py")
  row = ablations.run_one(workdir, path, dataclasses.replace(scale, flamingo_steps=6))
  assert row["group"] == "Tanh gating" and row["step_time_s"] > 0
  table = ablations.table_markdown([ablations.control_row(workdir, scale), row])
  assert "| Tanh gating | yes -> no |" in table and "Overall" in table


def test_every_ablation_config_is_valid_and_changes_something(tmp_path):
  workdir = str(tmp_path)
  base = ablations.demo_base(workdir)
  paths = ablations.ablation_paths()
  assert len(paths) >= 18
  for path in paths:
    module = ablations.load_ablation(path)
    config = module.get_config(workdir)
    assert config.to_dict() != base.to_dict(), path
    if "ablation_vision" in config:
      with config.unlocked():
        del config["ablation_vision"]
    train.setup(train.with_default_sections(config))  # every section validates
    model_config(config)


def test_remove_datasets_names_bad_input(tmp_path):
  config = ablations.demo_base(str(tmp_path))
  with pytest.raises(ValueError, match="no dataset 'nope'"):
    ablations.remove_datasets(config, "nope")
  with pytest.raises(ValueError, match="no training dataset left"):
    ablations.remove_datasets(config, *list(config.data.datasets))


def test_table_layout_and_overall():
  row = {"name": "demo", "table": "3", "group": "Flamingo (control)", "change": "-",
         "scores": {"captions": {"0": 10.0, "4": 40.0}, "vqa": {"0": 5.0, "4": 20.0}},
         "metrics": {"captions": "CIDEr", "vqa": "VQA acc."}, "shots": [0, 4],
         "step_time_s": 0.5}
  half = dict(row, name="x", group="G", change="a -> b",
              scores={"captions": {"0": 1.0, "4": 20.0}, "vqa": {"0": 1.0, "4": 10.0}})
  table = ablations.table_markdown([row, half])
  assert "| captions CIDEr (0/4-shot mean) | vqa VQA acc. (0/4-shot mean) |" in table
  # captions (1 + 20) / 2 = 10.5 vs 25; vqa 5.5 vs 12.5: overall (0.42 + 0.44) / 2
  assert "| 3 | G | a -> b | 0.500 | 10.5 | 5.5 | 0.43 |" in table
  assert np.isclose(float(table.splitlines()[2].rsplit("|", 2)[-2]), 1.0)
