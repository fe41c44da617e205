"""The ablation table's paper comparison: each config's PAPER_OVERALL is the paper's
number, the direction and the agreement count are computed, and a bad PAPER_OVERALL
is refused at load."""
import json
import os
import re

import pytest

from flamingo_jax.apps import ablations

# Paper Table 3 / Table 10 (Flamingo-3B "Overall", control 70.7), as listed in
# /work/shared/reference/flamingo.md section 4: the number each config must carry, over
# the paper's row that matches the demo's control (70.7, except p_next: the demo's control
# uses p_next 0, the paper's 69.6 row).
PAPER = {"no_video": 67.3, "no_pairs": 60.9, "no_interleaved": 53.4, "round_robin": 62.9,
         "no_tanh_gating": 66.5, "vanilla_xattn": 66.9, "xattn_middle": 59.8,
         "xattn_every_4": 68.8, "xattn_every_2": 68.2, "resampler_mlp": 66.6,
         "resampler_transformer": 66.7, "vision_patch_encoder": 64.9, "lm_from_scratch": 57.8,
         "lm_unfrozen": 62.7, "resampler_small": 67.9, "resampler_large": 69.0,
         "all_previous_images": 63.5, "p_next_half": (70.7, 69.6),
         "p_next_1": (70.4, 69.6),
         "vision_unfrozen": 68.1}


def row(name, captions, vqa, paper=None):
  """A result row whose headline (mean over shots 0 and 4) is captions / vqa."""
  r = {"name": name, "table": "3", "group": f"G {name}", "change": "a -> b",
       "scores": {"captions": {"0": captions, "4": captions}, "vqa": {"0": vqa, "4": vqa}},
       "metrics": {"captions": "CIDEr", "vqa": "VQA acc."}, "shots": [0, 4],
       "step_time_s": 0.25}
  if paper is not None:
    r["paper_overall"] = paper
  return r


def test_every_config_carries_the_papers_number():
  names = {os.path.splitext(os.path.basename(p))[0]: p for p in ablations.ablation_paths()}
  assert set(names) == set(PAPER)
  for name, score in PAPER.items():
    score, control = score if isinstance(score, tuple) else (score, 70.7)
    module = ablations.load_ablation(names[name])
    assert module.PAPER_OVERALL == pytest.approx(score / control), name


def test_direction_and_agreement():
  assert ablations.direction(0.9) == "lower" and ablations.direction(1.2) == "higher"
  assert ablations.direction(1.0) == "same" and ablations.direction(float("nan")) == "-"
  assert ablations.agrees(0.5, 0.9) is True and ablations.agrees(1.4, 0.76) is False
  assert ablations.agrees(0.9, 1.1) is False and ablations.agrees(1.1, 1.05) is True
  assert ablations.agrees(0.9, None) is None and ablations.agrees(0.9, 1.0) is None
  assert ablations.agrees(1.0, 0.9) is False  # level with the control is not "lower"


def test_table_counts_the_rows_that_agree():
  rows = [row("demo", 100.0, 50.0),
          row("worse", 50.0, 25.0, paper=0.9),     # overall 0.50: agrees
          row("better", 150.0, 50.0, paper=0.76),  # overall 1.25: disagrees
          row("unknown", 90.0, 50.0)]              # no paper number: not counted
  out = ablations.with_agreement(rows)
  assert [r["agrees"] for r in out] == [None, True, False, None]
  assert [round(r["overall"], 2) for r in out] == [1.0, 0.5, 1.25, 0.95]
  table = ablations.table_markdown(rows)
  lines = table.splitlines()
  assert lines[0].endswith("| Overall (x control) | Paper direction | Agrees | "
                           "Paper overall (x its control) |")
  assert len({line.count("|") for line in lines}) == 1  # every row fills every column
  assert lines[2].endswith("| 100.0 | 50.0 | 1.00 | - | - | 1.000 |")
  assert lines[3].endswith("| 50.0 | 25.0 | 0.50 | lower | yes | 0.900 |")
  assert lines[4].endswith("| 150.0 | 50.0 | 1.25 | lower | **no** | 0.760 |")
  assert lines[5].endswith("| 90.0 | 50.0 | 0.95 | - | - | - |")
  count = ablations.agreement_line(rows)
  assert re.match(r"1 of 2 ablations move the same way .* \(there 2 of 2 score below it\); "
                  r"1 without a paper direction\.$", count), count


def test_bad_paper_overall_is_refused(tmp_path):
  src = open(os.path.join(ablations.ABLATION_DIR, "no_video.py")).read()
  for bad in ("67.3", "'0.95'", "None", "True"):
    path = tmp_path / "bad.py"
    path.write_text(re.sub(r"PAPER_OVERALL = .*", f"PAPER_OVERALL = {bad}", src))
    with pytest.raises(ValueError, match=r"bad.py: PAPER_OVERALL must be"):
      ablations.load_ablation(str(path))
  path.write_text(re.sub(r"PAPER_OVERALL = .*\n", "", src))
  with pytest.raises(ValueError, match=r"missing \['PAPER_OVERALL'\]"):
    ablations.load_ablation(str(path))


def test_a_finished_row_gets_the_configs_current_paper_number(tmp_path):
  """result.json files written before PAPER_OVERALL existed still get a direction."""
  out = tmp_path / "ablations" / "no_video"
  out.mkdir(parents=True)
  (out / "result.json").write_text('{"name": "no_video", "scores": {}}')
  path = os.path.join(ablations.ABLATION_DIR, "no_video.py")
  got = ablations.run_one(str(tmp_path), path, scale=None)  # skipped: nothing trains
  assert got["paper_overall"] == pytest.approx(67.3 / 70.7) and got["name"] == "no_video"


def test_the_table_is_written_after_every_row(tmp_path, monkeypatch):
  """A run stopped part-way (a crash, a kill, a session's end) keeps the finished rows'
  table and says which ablations are still to run."""
  monkeypatch.setattr(ablations, "control_row", lambda workdir, scale: row("demo", 100, 50))
  done = []

  def run_one(workdir, path, scale):
    name = os.path.splitext(os.path.basename(path))[0]
    if done:
      raise RuntimeError(f"stopped before {name}")
    done.append(name)
    return row(name, 80, 50, paper=0.9)

  monkeypatch.setattr(ablations, "run_one", run_one)
  with pytest.raises(RuntimeError, match="stopped before no_pairs"):
    ablations.main(["--workdir", str(tmp_path), "--only", "no_video,no_pairs"])
  text = (tmp_path / "ablations" / "ablations.md").read_text()
  assert "G no_video" in text and "| 0.90 |" in text
  assert "Not run yet (1): no_pairs." in text
  assert "1 of 1 ablations move the same way" in text


def test_the_controls_seeds_give_the_band_a_row_must_leave(tmp_path):
  """With the control's seeds on disk (demo --seeds), the table says how far a seed
  moves the control and which rows lie beyond that; without them, how to measure it."""
  control = row("demo", 100.0, 50.0)
  rows = [control, row("far", 50.0, 25.0, paper=0.9), row("near", 95.0, 50.0, paper=0.9),
          row("far_up", 150.0, 50.0, paper=0.9)]
  assert "--seeds 0,1,2" in ablations.band_line(rows, [])
  for seed, (c, v) in {1: (90.0, 50.0), 2: (100.0, 46.0)}.items():
    out = tmp_path / f"seed_{seed}" / "eval"
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({
        "results": {"flamingo": row("x", c, v)["scores"]},
        "metrics": control["metrics"], "shots": control["shots"]}))
  seeds = ablations.seed_controls(str(tmp_path))
  assert [s["name"] for s in seeds] == ["seed 1", "seed 2"]
  assert ablations.seed_band(control, seeds) == pytest.approx(0.05)  # seed 1: 0.95x
  line = ablations.band_line(rows, seeds)
  assert line.startswith("The control's other seeds score seed 1 0.95x, seed 2 0.96x of it")
  assert "within 0.05 of 1.00; 2 of 3 rows lie beyond that band, 1 of them in the " in line
  ablations.write_table(str(tmp_path), "demo", rows)
  got = json.loads((tmp_path / "ablations" / "results.json").read_text())
  assert [r["beyond_seed_spread"] for r in got] == [None, True, False, True]
