"""Evaluation metrics against their reference implementations.

CIDEr-D: pycocoevalcap's `Cider` (pure Python); its Java PTB tokenizer is
replaced by the golden file tests/fixtures/eval_ptb_golden.json (regenerate
with tests/fixtures/eval_make_ptb_golden.py). VQA: the official script's
published logic, written out below from the VQA evaluation code, and
OpenFlamingo's copy of it (its `VQAEval`). ROC-AUC: sklearn.
"""
import importlib.util
import json
import math
import os
import random

import numpy as np
import pytest

from flamingo_jax.evaluate import (cider_d, coco_tokenize, option_scores,
                                   positive_probability, ptb_tokenize,
                                   question_accuracy, rank_options, read_vqa, roc_auc,
                                   top_k_accuracy, vqa_accuracy)
from flamingo_jax.evaluate import vqa as vqa_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _fixture(name):
  return os.path.join(FIXTURES, name)


def _open_flamingo_vqa():
  """OpenFlamingo's vqa_metric.py, loaded by path (its package imports open_clip)."""
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    pytest.skip("open-flamingo is not installed")
  path = os.path.join(spec.submodule_search_locations[0], "eval", "vqa_metric.py")
  mod_spec = importlib.util.spec_from_file_location("_of_vqa_metric", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod


# ----------------------------------------------------------------------------- CIDEr


def test_ptb_tokenizer_matches_stanford_golden():
  golden = json.load(open(_fixture("eval_ptb_golden.json")))
  assert len(golden) >= 80
  for item in golden:
    assert " ".join(ptb_tokenize(item["raw"])) == item["ptb"], item["raw"]
    assert coco_tokenize(item["raw"]) == item["coco"], item["raw"]


def test_coco_tokenize_keeps_lowercased_bracket_escapes():
  # pycocoevalcap removes "-LRB-" but the tokenizer lower-cases: "-lrb-" stays.
  assert coco_tokenize("A boy (5) eats.") == "a boy -lrb- 5 -rrb- eats"
  assert coco_tokenize("Don't stop!!") == "do n't stop !!"  # only a lone "!" goes


def _cider_reference():
  return pytest.importorskip("pycocoevalcap.cider.cider").Cider()


def _assert_same_cider(refs, cands):
  ref_score, ref_items = _cider_reference().compute_score(
      refs, {k: [v] for k, v in cands.items()})
  ours = cider_d(refs, cands, tokenize=False)
  np.testing.assert_allclose(ours.corpus, ref_score, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose([ours.per_item[k] for k in refs], ref_items, rtol=1e-12,
                             atol=1e-15)
  return ours


def test_cider_d_matches_pycocoevalcap_on_fixture():
  data = json.load(open(_fixture("eval_cider_captions.json")))
  refs = {k: [coco_tokenize(r) for r in v] for k, v in data["references"].items()}
  cands = {k: coco_tokenize(v) for k, v in data["candidates"].items()}
  assert all(len(v) == 5 for v in refs.values()) and len(refs) == 8
  ours = _assert_same_cider(refs, cands)
  assert 1.0 < ours.corpus < 3.0  # a plausible corpus, not a degenerate one
  # tokenize=True does the same tokenization itself.
  raw = cider_d(data["references"], data["candidates"])
  assert raw.corpus == ours.corpus and raw.per_item == ours.per_item


def test_cider_d_document_frequencies_are_corpus_level():
  data = json.load(open(_fixture("eval_cider_captions.json")))
  refs = {k: [coco_tokenize(r) for r in v] for k, v in data["references"].items()}
  cands = {k: coco_tokenize(v) for k, v in data["candidates"].items()}
  subset = {k: refs[k] for k in list(refs)[:3]}
  small = _assert_same_cider(subset, {k: cands[k] for k in subset})
  full = cider_d(refs, cands, tokenize=False)
  assert small.per_item["101"] != full.per_item["101"]


def test_cider_d_matches_pycocoevalcap_on_random_corpus():
  rng = random.Random(0)
  vocab = [f"w{i}" for i in range(25)]
  sentence = lambda lo, hi: " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))
  refs = {i: [sentence(1, 14) for _ in range(5)] for i in range(40)}
  cands = {i: sentence(1, 16) for i in range(40)}
  cands[0] = ""  # empty output
  cands[1] = refs[1][2]  # copies a reference
  cands[2] = " ".join([refs[2][0].split()[0]] * 12)  # repetition, which clipping caps
  cands[3] = "unseen words only"  # n-grams with df = 0
  refs[4] = [refs[4][0]] * 5  # identical references
  _assert_same_cider(refs, cands)


def test_cider_d_rejects_bad_input():
  with pytest.raises(ValueError, match="same ids"):
    cider_d({1: ["a cat"]}, {2: "a cat"})
  with pytest.raises(ValueError, match="non-empty list"):
    cider_d({1: []}, {1: "a cat"})
  with pytest.raises(ValueError, match="non-empty list"):
    cider_d({1: "a cat"}, {1: "a cat"})
  with pytest.raises(TypeError, match="candidate for item 1"):
    cider_d({1: ["a cat"]}, {1: ["a cat"]})


# ------------------------------------------------------------------------------- VQA

# The official VQA evaluation (vqaEval.py of the VQA API), transcribed from
# its published logic and kept deliberately close to it, so our vectorised
# version is checked against the algorithm rather than against itself.

def _official_accuracy(pred, answers, normalizer):
  gts = [{"answer": a, "answer_id": i} for i, a in enumerate(answers)]
  res = pred.replace("\n", " ").replace("\t", " ").strip()
  res = normalizer.processDigitArticle(normalizer.processPunctuation(res))
  if len(set(a["answer"] for a in gts)) > 1:
    for a in gts:
      a["answer"] = normalizer.processPunctuation(a["answer"])
  accs = []
  for gt in gts:
    others = [a for a in gts if a != gt]
    matching = [a for a in others if a["answer"] == res]
    accs.append(min(1, float(len(matching)) / 3))
  return float(sum(accs)) / len(accs)


@pytest.mark.parametrize("pred,answers,official,open_flamingo", [
    ("two", ["2"] * 10, 1.0, 1.0),  # predictions map number words to digits
    ("2", ["two"] * 10, 0.0, 1.0),  # unanimous human answers are left as they are
    ("a dog", ["dog"] * 10, 1.0, 1.0),  # articles go from the prediction
    ("dog", ["a dog"] * 10, 0.0, 1.0),
    ("yes.", ["yes"] * 10, 1.0, 1.0),  # periods are stripped
    ("Yes", ["yes"] * 2 + ["no"] * 8, 0.6, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
    ("yes", ["yes"] * 1 + ["no"] * 9, 0.3, 0.3),  # (1 * 0 + 9 * 1/3) / 10
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9, 0.9),  # (3 * 2/3 + 7 * 1) / 10
    ("yes", ["yes"] * 4 + ["no"] * 6, 1.0, 1.0),
    ("T-Shirt", ["t-shirt"] * 5 + ["shirt"] * 5, 1.0, 1.0),  # "-" -> " ": "t shirt"
    ("t-shirt", ["t-shirt"] * 10, 0.0, 1.0),  # ... but not in unanimous answers
    ("1000", ["1,000"] * 4 + ["1000"] * 6, 1.0, 1.0),  # digit,digit: commas deleted
    ("dont", ["don't"] * 3 + ["stop"] * 7, 0.9, 0.9),  # contractions restored
    ("zero", ["none"] * 8 + ["0"] * 2, 0.6, 1.0),  # "none" -> "0" only when normalised
    ("Mr. Smith", ["mr. smith"] * 4 + ["smith"] * 6, 1.0, 1.0),
])
def test_vqa_accuracy_published_cases(pred, answers, official, open_flamingo):
  assert question_accuracy(pred, answers) == pytest.approx(official, abs=1e-12)
  assert question_accuracy(pred, answers, gt_normalisation="open_flamingo") == \
      pytest.approx(open_flamingo, abs=1e-12)


def test_vqa_normalisation_tables_match_the_official_ones():
  ref = _open_flamingo_vqa().VQAEval(None, None)
  assert vqa_lib._CONTRACTIONS == ref.contractions
  assert vqa_lib._NUMBERS == ref.manualMap
  assert vqa_lib._PUNCTUATION == tuple(ref.punct)
  assert sorted(vqa_lib._ARTICLES) == sorted(ref.articles)
  # The script's re.sub(..., re.UNICODE) caps period stripping at 32.
  for text in ("." * 40, "a.b. 3.5, c,d", "x, y"):
    assert vqa_lib.normalize_punctuation(text) == ref.processPunctuation(text)
  assert vqa_lib.normalize_punctuation("." * 40) == "." * 8


def test_vqa_accuracy_matches_official_logic_on_random_answers():
  ref = _open_flamingo_vqa().VQAEval(None, None)
  pool = ["2", "two", "a dog", "dog", "Dog.", "yes", "yes.", "no", "t-shirt", "t shirt",
          "1,000", "1000", "dont", "don't", "none", "0", "mr. smith", "3.5", "left/right",
          "the (red) car", "red car", "hi!", "hi", "can't", "cant", "x,y", "a-b c"]
  rng = random.Random(1)
  for _ in range(400):
    answers = [rng.choice(pool[:rng.randint(2, len(pool))]) for _ in range(10)]
    pred = rng.choice(pool)
    assert question_accuracy(pred, answers) == pytest.approx(
        _official_accuracy(pred, answers, ref), abs=1e-12), (pred, answers)
    # OpenFlamingo's variant: every answer fully normalised.
    full = [ref.processDigitArticle(ref.processPunctuation(a.strip())) for a in answers]
    assert question_accuracy(pred, answers, gt_normalisation="open_flamingo") == \
        pytest.approx(_official_accuracy(pred, full, ref), abs=1e-12)


def test_vqa_breakdowns_match_open_flamingo_vqaeval(tmp_path):
  of = _open_flamingo_vqa()
  qpath, apath = _fixture("eval_vqa_questions.json"), _fixture("eval_vqa_annotations.json")
  preds = {int(k): v for k, v in json.load(open(_fixture("eval_vqa_predictions.json"))).items()}
  res_path = tmp_path / "results.json"
  res_path.write_text(json.dumps([{"question_id": q, "answer": a} for q, a in preds.items()]))
  ref_vqa = of.VQA(apath, qpath)
  ref_eval = of.VQAEval(ref_vqa, ref_vqa.loadRes(str(res_path), qpath), n=2)
  ref_eval.evaluate()
  ours = vqa_accuracy(preds, read_vqa(qpath, apath), gt_normalisation="open_flamingo")
  assert round(ours.overall, 2) == ref_eval.accuracy["overall"]
  assert {k: round(v, 2) for k, v in ours.per_question_type.items()} == \
      ref_eval.accuracy["perQuestionType"]
  assert {k: round(v, 2) for k, v in ours.per_answer_type.items()} == \
      ref_eval.accuracy["perAnswerType"]
  assert {k: round(v, 2) for k, v in ours.per_question.items()} == ref_eval.evalQA


def test_vqa_accuracy_official_breakdowns_by_hand():
  qpath, apath = _fixture("eval_vqa_questions.json"), _fixture("eval_vqa_annotations.json")
  preds = {int(k): v for k, v in json.load(open(_fixture("eval_vqa_predictions.json"))).items()}
  examples = read_vqa(qpath, apath)
  scores = vqa_accuracy(preds, examples)
  expected = {1001: 100, 1002: 0, 1003: 100, 1004: 0, 1005: 100, 1006: 60, 1007: 90,
              1008: 30, 1013: 100, 1016: 0}
  for qid, acc in expected.items():
    assert scores.per_question[qid] == pytest.approx(acc, abs=1e-9), qid
  number = [scores.per_question[e.question_id] for e in examples if e.answer_type == "number"]
  assert scores.per_answer_type["number"] == pytest.approx(sum(number) / len(number))
  assert scores.per_question_type["is the"] == pytest.approx((60 + 90 + 30) / 3)
  assert scores.overall == pytest.approx(np.mean(list(scores.per_question.values())))


def test_vqa_accuracy_rejects_bad_input():
  examples = read_vqa(_fixture("eval_vqa_questions.json"),
                      _fixture("eval_vqa_annotations.json"))
  preds = {e.question_id: "yes" for e in examples}
  with pytest.raises(ValueError, match="1 questions have no prediction"):
    vqa_accuracy({k: v for k, v in preds.items() if k != 1001}, examples)
  with pytest.raises(ValueError, match="1 predictions have no question"):
    vqa_accuracy({**preds, 5: "no"}, examples)
  with pytest.raises(ValueError, match="gt_normalisation"):
    question_accuracy("yes", ["yes"] * 10, gt_normalisation="lenient")
  with pytest.raises(ValueError, match="at least 2 human answers"):
    question_accuracy("yes", ["yes"])
  with pytest.raises(ValueError, match="question 1001"):
    vqa_accuracy({**preds, 1001: None}, examples)


# -------------------------------------------------------------------- classification


def test_option_scores_length_normalised_padded_and_ragged():
  ragged = [[-1.0, -3.0], [-0.5], [-2.0, -2.0, -2.0]]
  padded = [[-1.0, -3.0, 99.0], [-0.5, 99.0, 99.0], [-2.0, -2.0, -2.0]]
  lengths = [2, 1, 3]
  np.testing.assert_allclose(option_scores(ragged), [-2.0, -0.5, -2.0])
  np.testing.assert_allclose(option_scores(padded, lengths), [-2.0, -0.5, -2.0])
  np.testing.assert_allclose(option_scores(padded, lengths, normalize=False),
                             [-4.0, -0.5, -6.0])
  batch = option_scores(np.stack([padded, padded]), np.array([lengths, lengths]))
  assert batch.shape == (2, 3)
  np.testing.assert_array_equal(rank_options([-2.0, -0.5, -2.0]), [1, 0, 2])
  with pytest.raises(ValueError, match="lengths must be integers"):
    option_scores(padded, [2, 0, 3])
  with pytest.raises(ValueError, match="do not match"):
    option_scores(padded, [2, 1])


def test_top_k_accuracy_by_hand():
  scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.3, 0.3, 0.4], [0.2, 0.2, 0.2]])
  labels = np.array([1, 1, 2, 0])
  assert top_k_accuracy(scores, labels) == 0.75  # the tie row predicts class 0
  assert top_k_accuracy(scores, labels, k=2) == 1.0
  with pytest.raises(ValueError, match="class indices"):
    top_k_accuracy(scores, np.array([1, 1, 3, 0]))
  with pytest.raises(ValueError, match="k=4"):
    top_k_accuracy(scores, labels, k=4)


def test_roc_auc_matches_sklearn():
  metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  for n in (2, 7, 50, 300):
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    for scores in (rng.normal(size=n), rng.integers(0, 4, n).astype(float)):  # with ties
      assert roc_auc(labels, scores) == pytest.approx(
          metrics.roc_auc_score(labels, scores), rel=1e-12, abs=1e-12)
  # Two ("no", "yes") option scores -> P(yes), as HatefulMemes is scored.
  opts = rng.normal(size=(20, 2))
  labels = rng.integers(0, 2, 20)
  labels[:2] = [0, 1]
  p = positive_probability(opts)
  np.testing.assert_allclose(p, np.exp(opts[:, 1]) / np.exp(opts).sum(1))
  assert roc_auc(labels, p) == pytest.approx(metrics.roc_auc_score(labels, p), rel=1e-12)


def test_roc_auc_by_hand_and_errors():
  # Pairs (pos, neg): (0.8, 0.1) win, (0.8, 0.4) win, (0.4, 0.1) win, (0.4, 0.4) tie.
  assert roc_auc([1, 0, 1, 0], [0.8, 0.1, 0.4, 0.4]) == 3.5 / 4
  with pytest.raises(ValueError, match="both positive and negative"):
    roc_auc([1, 1], [0.2, 0.3])
  with pytest.raises(ValueError, match="0 or 1"):
    roc_auc([1, 2], [0.2, 0.3])
  assert math.isclose(roc_auc([0, 1], [0.9, 0.1]), 0.0)
