"""tools/shot_diff: what the demonstrations change in a captioning run's predictions."""
import json

from flamingo_jax.errors import run_cli
from flamingo_jax.apps import shot_diff


def _write(folder, shots, predictions):
  refs = ["a red circle on the left", "a blue square in the middle", "a green triangle"]
  records = [{"id": i, "prediction": p, "references": [r]}
             for i, (p, r) in enumerate(zip(predictions, refs))]
  (folder / f"captions_{shots}shot.json").write_text(json.dumps(records))


def test_counts_unchanged_exact_length_and_wrong_words(tmp_path, capsys):
  folder = tmp_path / "predictions"
  folder.mkdir()
  _write(folder, 0, ["a red circle on the left", "a red square in the middle", "a shape"])
  _write(folder, 8, ["a red circle on the right", "a red square in the middle",
                     "a green triangle"])
  got = shot_diff.summarise(shot_diff.load_predictions(str(tmp_path), "captions"))
  assert got[0]["unchanged"] == 3 and got[8]["unchanged"] == 1
  assert got[0]["exact"] == 1 and got[8]["exact"] == 1
  assert got[0]["mean_words"] == 14 / 3 and got[8]["mean_words"] == 15 / 3
  # 0-shot: "a shape" is shorter than its reference, so 2 same-length captions, 1 wrong word
  assert got[0]["same_length"] == 2 and got[0]["wrong_words_per_caption"] == 0.5
  assert got[8]["same_length"] == 3 and got[8]["wrong_words_per_caption"] == 2 / 3
  assert run_cli(shot_diff.main, [str(tmp_path)]) == 0
  assert "| 8 | 3 | 1 | 1 | 5.00 | 0.67 (3) |" in capsys.readouterr().out


def test_a_directory_without_predictions_is_named(tmp_path, capsys):
  assert run_cli(shot_diff.main, [str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "captions_{N}shot.json" in err and str(tmp_path) in err
  folder = tmp_path / "predictions"
  folder.mkdir()
  (folder / "captions_0shot.json").write_text(json.dumps([{"id": 0, "text": "x"}]))
  assert run_cli(shot_diff.main, [str(tmp_path)]) == 2
  assert "captions_0shot.json: a record without 'prediction'" in capsys.readouterr().err
