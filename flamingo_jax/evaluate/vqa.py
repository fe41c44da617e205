"""VQA accuracy (VQAv2, OK-VQA, VizWiz, TextVQA), as the official VQA script computes it.

A prediction is compared with each leave-one-out subset of the human answers
(10 per question): accuracy = min(1, #matches among the other answers / 3),
averaged over the subsets. Before comparing, the official script normalises:

* the prediction always: newlines/tabs to spaces, strip, punctuation rules,
  lower-case, number words to digits ("two" -> "2"), articles dropped,
  contractions restored ("dont" -> "don't");
* the human answers only with the punctuation rules (no stripping, no
  lower-casing), and only when the answers of that question are not all
  identical.

`gt_normalisation="open_flamingo"` instead gives the human answers the same
full normalisation as the prediction, always (OpenFlamingo's copy of the
script does this); the two differ only where a human answer changes under the
full normalisation but not under the official rules ("two", "a dog", or a
unanimous "t-shirt").

The punctuation rules, quirks kept: a punctuation mark is deleted when it
touches a space in the text or when the text has a digit-comma-digit; else it
becomes a space. Periods not followed by a digit are deleted (at most 32: the
official script passes re.UNICODE where `re.sub` takes its count). Apostrophes
and colons are left alone.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Hashable, Iterable, Mapping, Optional, Sequence

from flamingo_jax.errors import require_extra

GT_NORMALISATIONS = ("official", "open_flamingo")

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_ARTICLES = frozenset(("a", "an", "the"))
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def _contraction_table() -> dict[str, str]:
  """The official script's map from misspelt contractions to contractions.

  Its keys are each contraction below with one of its apostrophes dropped
  ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've"), plus
  three irregular entries, "somebody'd" -> "somebodyd" (backwards there) among
  them. Keys with capitals ("Im") never match, as the text is lower-cased
  first; kept for fidelity.
  """
  contractions = (
      "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't "
      "hadn't've hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't "
      "it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't "
      "not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've "
      "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
      "something'd something'd've something'll that's there'd there'd've there're there's "
      "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll "
      "what're what's what've when's where'd where's where've who'd who'd've who'll who's "
      "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
      "y'all'd've you'd you'd've you'll you're you've").split()
  table = {}
  for word in contractions:
    for i, c in enumerate(word):
      if c == "'":
        table[word[:i] + word[i + 1:]] = word
  table.update({"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"})
  return table


_CONTRACTIONS = _contraction_table()


def normalize_punctuation(text: str) -> str:
  """The official script's punctuation rules (see the module docstring)."""
  delete = bool(_DIGIT_COMMA_DIGIT.search(text))
  out = text
  for p in _PUNCTUATION:
    if delete or (p + " ") in text or (" " + p) in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=32)


def _digits_articles(text: str) -> str:
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
  """An answer as the official script normalises a prediction ("Two dogs." -> "2 dogs")."""
  if not isinstance(answer, str):
    raise TypeError(f"normalize_answer expects a str, got {type(answer).__name__}")
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return _digits_articles(normalize_punctuation(answer))


def question_accuracy(prediction: str, answers: Sequence[str], *,
                      gt_normalisation: str = "official") -> float:
  """Accuracy in [0, 1] of one predicted answer against the human answers."""
  if gt_normalisation not in GT_NORMALISATIONS:
    raise ValueError(f"gt_normalisation must be one of {GT_NORMALISATIONS}, got "
                     f"{gt_normalisation!r}")
  if isinstance(answers, str) or len(answers) < 2:
    raise ValueError(f"VQA accuracy needs a list of at least 2 human answers (leave-one-"
                     f"out), got {answers!r}")
  bad = [a for a in answers if not isinstance(a, str)]
  if bad:
    raise TypeError(f"human answers must be str, got {bad[0]!r}")
  pred = normalize_answer(prediction)
  if gt_normalisation == "open_flamingo":
    gts = [normalize_answer(a) for a in answers]
  elif len(set(answers)) > 1:
    gts = [normalize_punctuation(a) for a in answers]
  else:  # the official script leaves unanimous answers untouched, spaces included
    gts = list(answers)
  matches = [g == pred for g in gts]
  total = sum(matches)
  return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


@dataclasses.dataclass(frozen=True)
class VQAScores:
  """Accuracies in percent (the official script also rounds them to 2 decimals)."""
  overall: float
  per_question_type: dict
  per_answer_type: dict
  per_question: dict


def vqa_accuracy(predictions: Mapping[Hashable, str], examples: Iterable, *,
                 gt_normalisation: str = "official") -> VQAScores:
  """VQA accuracy over `examples` (objects with question_id, answers and
  optional question_type / answer_type, e.g. `datasets.VQAExample`).

  Every example needs a prediction and every prediction an example, so a
  dropped or misnumbered batch fails here instead of shifting the score.
  Answer types default to "other" as in OpenFlamingo's script; questions
  without a question type are left out of that breakdown only.
  """
  examples = list(examples)
  ids = [ex.question_id for ex in examples]
  dupes = [q for q, c in collections.Counter(ids).items() if c > 1]
  if dupes:
    raise ValueError(f"vqa_accuracy: duplicate question ids in examples: {dupes[:5]}")
  missing = [q for q in ids if q not in predictions]
  extra = sorted(set(predictions) - set(ids), key=str)
  if missing or extra:
    raise ValueError(f"vqa_accuracy: {len(missing)} questions have no prediction (first: "
                     f"{missing[:5]}), {len(extra)} predictions have no question (first: "
                     f"{extra[:5]})")
  if not examples:
    raise ValueError("vqa_accuracy: no questions to score")
  per_question = {}
  by_qtype, by_atype = collections.defaultdict(list), collections.defaultdict(list)
  for ex in examples:
    try:
      acc = 100.0 * question_accuracy(predictions[ex.question_id], ex.answers,
                                      gt_normalisation=gt_normalisation)
    except (TypeError, ValueError) as e:
      raise ValueError(f"vqa_accuracy: question {ex.question_id!r}: {e}") from None
    per_question[ex.question_id] = acc
    qtype: Optional[str] = getattr(ex, "question_type", None)
    if qtype is not None:
      by_qtype[qtype].append(acc)
    by_atype[getattr(ex, "answer_type", None) or "other"].append(acc)
  mean = lambda xs: sum(xs) / len(xs)
  return VQAScores(overall=mean(list(per_question.values())),
                   per_question_type={k: mean(v) for k, v in by_qtype.items()},
                   per_answer_type={k: mean(v) for k, v in by_atype.items()},
                   per_question=per_question)


# ------------------------------------------------------------------ answer post-processing

ANSWER_POSTPROCESS = ("none", "vqa", "ok_vqa")
_STEMMER = None
# NLTK data the OK-VQA stemmer reads (tokenizer, tagger, lemmatizer; nltk >= 3.9 names).
NLTK_DATA = ("punkt_tab", "averaged_perceptron_tagger_eng", "wordnet")
_NEW_LABEL = re.compile("Question|Answer|Short")


def postprocess_vqa_answer(answer: str) -> str:
  """OpenFlamingo's VQA post-processing of a generated answer: cut at the first
  "Question" / "Answer" / "Short" (a new demonstration) and the first ", "."""
  return _NEW_LABEL.split(answer, maxsplit=1)[0].split(", ", 1)[0]


def _ok_vqa_stemmer():
  """OpenFlamingo's OK-VQA stemmer (OK-VQA v1.1's rules: NLTK tokenizer and tagger,
  WordNet verb lemmas for "-ing", inflection's singular for plural nouns, a
  manual table), vendored unchanged as evaluate/ok_vqa_stem.py."""
  global _STEMMER
  if _STEMMER is not None:
    return _STEMMER
  require_extra(("nltk", "inflection"), "okvqa", "OK-VQA stemming (answer_postprocess="
                "'ok_vqa'; or set the task's answer_postprocess to 'vqa')")
  from flamingo_jax.evaluate import ok_vqa_stem  # pylint: disable=import-outside-toplevel
  stemmer = ok_vqa_stem.OKVQAStemmer()
  try:
    stemmer.stem("riding horses")
  except LookupError as e:
    first = " ".join(str(e).split())[:160]
    raise ValueError("OK-VQA stemming needs NLTK's data, not installed: python -m "
                     f"nltk.downloader {' '.join(NLTK_DATA)} ({first})") from None
  _STEMMER = stemmer
  return stemmer


def check_answer_postprocess(name: str) -> None:
  """ValueError unless `name` is known and its dependencies load (before any model runs)."""
  if name not in ANSWER_POSTPROCESS:
    raise ValueError(f"answer_postprocess {name!r}: expected one of {ANSWER_POSTPROCESS}")
  if name == "ok_vqa":
    _ok_vqa_stemmer()


def postprocess_answer(answer: str, name: str) -> str:
  """"none": as generated; "vqa": `postprocess_vqa_answer`; "ok_vqa": that, then
  OpenFlamingo's OK-VQA stemming (OK-VQA's annotations hold stemmed answers)."""
  if name == "none":
    return answer
  answer = postprocess_vqa_answer(answer)
  if name == "ok_vqa":
    answer = _ok_vqa_stemmer().stem(answer)
  elif name != "vqa":
    raise ValueError(f"answer_postprocess {name!r}: expected one of {ANSWER_POSTPROCESS}")
  return answer
