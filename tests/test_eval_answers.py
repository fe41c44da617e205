"""VQA answer post-processing against OpenFlamingo's own functions, run in the test."""
import importlib.util
import os

import pytest

from flamingo_jax.evaluate import vqa

GENERATIONS = ["red", " two dogs, one cat", "yes Question: what", "a bus Answer: no",
               "blue, red, green", "Short answer: left", "riding horses", "", "3, 000",
               "tennis rackets\nQuestion"]


def _open_flamingo_module(name):
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    pytest.skip("open-flamingo is not installed (make test installs it with --no-deps)")
  path = os.path.join(spec.submodule_search_locations[0], "eval", name)
  module_spec = importlib.util.spec_from_file_location("_of_" + name[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def test_vqa_cut_equals_open_flamingo():
  of = _open_flamingo_module("vqa_metric.py")
  for text in GENERATIONS:
    assert vqa.postprocess_vqa_answer(text) == of.postprocess_vqa_generation(text), text
    assert vqa.postprocess_answer(text, "vqa") == of.postprocess_vqa_generation(text)
  assert vqa.postprocess_answer(" as is, ", "none") == " as is, "


def test_ok_vqa_stemming_equals_open_flamingo_or_is_named():
  try:
    of = _open_flamingo_module("ok_vqa_utils.py")
    of.postprocess_ok_vqa_generation("riding horses")
  except (ImportError, LookupError) as e:
    # Without nltk / inflection / NLTK's data the run stops before any model, naming it.
    with pytest.raises(ValueError, match="OK-VQA stemming .*needs (nltk|NLTK's data)"):
      vqa.check_answer_postprocess("ok_vqa")
    pytest.skip(f"OpenFlamingo's OK-VQA stemmer cannot run here: {e}")
  for text in GENERATIONS:
    assert vqa.postprocess_answer(text, "ok_vqa") == of.postprocess_ok_vqa_generation(text)


def test_unknown_postprocess():
  with pytest.raises(ValueError, match="answer_postprocess 'stem'"):
    vqa.check_answer_postprocess("stem")


def test_vendored_ok_vqa_stemmer_is_open_flamingos():
  """evaluate/ok_vqa_stem.py is OpenFlamingo's table and stemmer, unchanged (as syntax trees:
  only the indentation differs), so it stems as OpenFlamingo where NLTK's data is missing."""
  import ast  # pylint: disable=import-outside-toplevel
  pytest.importorskip("nltk")
  pytest.importorskip("inflection")
  of = _open_flamingo_module("ok_vqa_utils.py")
  from flamingo_jax.evaluate import ok_vqa_stem  # pylint: disable=import-outside-toplevel
  assert ok_vqa_stem._MANUAL_MATCHES == of._MANUAL_MATCHES  # pylint: disable=protected-access

  def tree(path):
    (cls,) = [n for n in ast.parse(open(path).read()).body
              if isinstance(n, ast.ClassDef) and n.name == "OKVQAStemmer"]
    return ast.dump(cls)
  assert tree(ok_vqa_stem.__file__) == tree(of.__file__)


def test_ok_vqa_without_nltk_names_the_extra(monkeypatch, capsys):
  """Without nltk / inflection: one `error:` line naming `flamingo_jax[okvqa]`, status 2."""
  from flamingo_jax import errors  # pylint: disable=import-outside-toplevel
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "nltk" else real(name, *a))
  monkeypatch.setattr(vqa, "_STEMMER", None)
  assert errors.run_cli(lambda argv: vqa.check_answer_postprocess("ok_vqa"), []) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: OK-VQA stemming"), err
  assert "needs nltk, not installed: pip install 'flamingo_jax[okvqa]'" in err, err
