"""CIDEr-D for captioning (COCO, Flickr30k), as the COCO caption server scores it.

The published numbers (Flamingo, OpenFlamingo) come from pycocoevalcap: every
caption goes through the Stanford PTB tokenizer (Java) and loses its
punctuation tokens, then `Cider` (which is CIDEr-D: clipped n-gram counts,
Gaussian length penalty with sigma 6, x10) scores the corpus. This module does
both in pure Python so evaluation needs no JVM:

* `coco_tokenize(text)` stands in for pycocoevalcap's `PTBTokenizer` wrapper.
  It reproduces Stanford's PTBTokenizer 3.4.1 (`-preserveLines -lowerCase`) on
  caption-like text (tests/fixtures/eval_ptb_golden.json holds the Java output
  it is checked against). Known differences are listed in docs/evaluation.md.
* `cider_d(references, candidates)` equals pycocoevalcap's `Cider` scorer,
  quirks included: document frequencies over the references of the whole
  corpus passed in, idf = log(#images) - log(max(1, df)), raw n-gram counts as
  tf, sentence length measured as the number of bigrams, and the score on
  pycocoevalcap's scale (papers report it x100: 113.8 is 1.138 here).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
import unicodedata
from typing import Hashable, Mapping, Sequence

# What pycocoevalcap drops after tokenizing. The bracket escapes are listed in
# upper case but the tokenizer runs with -lowerCase, so "-lrb-" and friends
# survive into the scored text; we keep that behaviour.
PUNCTUATION_TOKENS = frozenset([
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
    ":", "-", "--", "...", ";"])

# Abbreviations whose period Stanford always keeps and never reads as the end
# of a sentence (titles, "ave.", "vs.", ...).
_TITLE_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st vs prof mt ft ave gen gov sen rep rev capt col lt sgt dept cf"
    .split())
# Abbreviations that keep their period and may also end a sentence, in which
# case Stanford adds a "." token after them.
_SENTENCE_ABBREVIATIONS = frozenset(
    "jr sr etc inc ltd co corp rd blvd est sq al calif ariz fla mich jan feb mar apr "
    "jun jul aug sep sept oct nov dec mon tue wed thu fri".split())
# Capitalised words that Stanford reads as the start of a new sentence after an
# acronym or an initial ("in the u.s. The ..."), found by probing the jar.
_SENTENCE_STARTERS = frozenset(
    "the a an he she it they we this that these there in at but so if when what her "
    "their our some many one you then however as after here while since now last more "
    "other such yet once".split())
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_CLITICS = ("'s", "'m", "'d", "'ll", "'re", "'ve")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-",
             "}": "-rcb-"}
_UNICODE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                          "\u2013": "--", "\u2014": "--", "\u2026": "...", "\u00a0": " "})
_TOKEN = re.compile(r"""
    (?P<ellipsis>\.\.\.+)
  | (?P<dashes>--+)
  | (?P<clitic>(?i:'s|'m|'d|'ll|'re|'ve|n't))(?![^\W_])
  | (?P<decade>'\d+s)(?![^\W_])
  | (?P<word>(?:[^\W_]+|\.\d+)(?:[-/.][^\W_]+|'[^\W\d_][^\W_]*|(?<=\d)[,:]\d+)*)
  | (?P<marks>[?!]+)
  | (?P<dquote>"|``|'')
  | (?P<squote>['`])
  | (?P<other>\S)
""", re.VERBOSE)
_ACRONYM = re.compile(r"[^\W\d_]{1,2}(?:\.[^\W\d_]{1,2})+")
_DECIMAL_UNIT = re.compile(r"(\d+\.\d+)([^\W\d_]+)")
_NEXT_WORD = re.compile(r"\s+([^\W\d_]+)(?=\s|$)")
_NEXT_CHAR = re.compile(r"\s+(\S)")


def _sentence_starts(rest: str, strict: bool) -> bool:
  """Does `rest`, the text after a period, start a new sentence?

  The end of the caption counts as one: Stanford looks into the next line of
  its batch, which in COCO files is usually a capitalised caption ("A ...").
  strict (after acronyms and initials): only a capitalised word from
  `_SENTENCE_STARTERS` starts one; otherwise any upper-case letter does.
  """
  if not rest.strip():
    return True
  if strict:
    m = _NEXT_WORD.match(rest)
    return bool(m) and m.group(1)[0].isupper() and m.group(1).lower() in _SENTENCE_STARTERS
  m = _NEXT_CHAR.match(rest)
  return bool(m) and m.group(1).isupper()


def _keeps_period(word: str, rest: str) -> tuple[bool, bool]:
  """(period stays on `word`, an extra "." token follows) for "word." + rest."""
  if word in _TITLE_ABBREVIATIONS:
    return True, False
  if word in _SENTENCE_ABBREVIATIONS:
    return True, _sentence_starts(rest, strict=False)
  if _ACRONYM.fullmatch(word):
    return True, _sentence_starts(rest, strict=True)
  if len(word) == 1 and word.isalpha():  # an initial, unless it ends a sentence
    return not _sentence_starts(rest, strict=True), False
  if word == "no":  # "no. 5"
    return bool(re.match(r"\s+\d", rest)), False
  return False, False


def _split_word(word: str) -> list[str]:
  """PTB splitting inside a word: clitics ("do n't", "it 's"), "can not", "2.5 m"."""
  if word in _SPLIT_WORDS:
    return list(_SPLIT_WORDS[word])
  m = _DECIMAL_UNIT.fullmatch(word)
  if m:
    return [m.group(1), m.group(2)]
  tail = []
  while True:
    clitic = next((c for c in _CLITICS if word.endswith(c) and len(word) > len(c)), None)
    if clitic is None and word.endswith("n't") and len(word) > 3:
      clitic = "n't"
    if clitic is None:
      break
    tail.insert(0, clitic)
    word = word[:-len(clitic)]
  return [word] + tail


def ptb_tokenize(text: str) -> list[str]:
  """Stanford-PTB-style tokens of one caption, lower-cased, punctuation kept."""
  if not isinstance(text, str):
    raise TypeError(f"ptb_tokenize expects a str, got {type(text).__name__}")
  text = unicodedata.normalize("NFC", text.replace("\n", " ")).translate(_UNICODE)
  tokens, pos = [], 0
  while True:
    while pos < len(text) and text[pos].isspace():
      pos += 1
    if pos == len(text):
      return tokens
    m = _TOKEN.match(text, pos)
    kind, tok, pos = m.lastgroup, m.group(), m.end()
    if kind == "ellipsis":
      tokens.append("...")
    elif kind == "dashes":
      tokens.append("--")
    elif kind == "clitic":
      tokens.append(tok.lower())
    elif kind == "word":
      pieces = _split_word(tok.lower())
      if (text[pos:pos + 1] == "." and text[pos + 1:pos + 2] != "."
          and not any(c.isdigit() for c in tok)):
        keep, extra = _keeps_period(tok.lower(), text[pos + 1:])
        if keep:
          pieces[-1] += "."
          pieces += ["."] if extra else []
          pos += 1
      tokens.extend(pieces)
    elif kind in ("dquote", "squote"):
      if tok in ("``", "''", "`"):
        tokens.append(tok)
        continue
      before = text[m.start() - 1] if m.start() > 0 else " "
      opening = before.isspace() or before in "([{\"'`"
      if kind == "dquote":
        tokens.append("``" if opening else "''")
      else:
        tokens.append("`" if opening else "'")
    elif kind == "other" and tok in _BRACKETS:
      tokens.append(_BRACKETS[tok])
    else:
      tokens.append(tok.lower())


def coco_tokenize(text: str) -> str:
  """A caption as pycocoevalcap scores it: PTB tokens minus punctuation, space-joined."""
  return " ".join(t for t in ptb_tokenize(text) if t not in PUNCTUATION_TOKENS)


@dataclasses.dataclass(frozen=True)
class CiderScores:
  """Corpus CIDEr-D (mean over items) and each item's score, pycocoevalcap scale."""
  corpus: float
  per_item: dict


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
  counts = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(tokens) - k + 1):
      counts[tuple(tokens[i:i + k])] += 1
  return counts


def cider_d(references: Mapping[Hashable, Sequence[str]],
            candidates: Mapping[Hashable, str], *, n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> CiderScores:
  """CIDEr-D of one candidate caption per item against that item's references.

  references: item id -> its reference captions (COCO: 5 each).
  candidates: item id -> the generated caption; the same ids as `references`.
  tokenize: True runs `coco_tokenize` on every caption; False takes captions
    as already tokenised (whitespace-separated tokens), as pycocoevalcap's
    `Cider.compute_score` does.
  The document frequencies come from the references of all items passed in,
  so the score of an item depends on the rest of the corpus, exactly as with
  pycocoevalcap; score a whole split in one call.
  """
  if n < 1:
    raise ValueError(f"cider_d: n must be >= 1, got {n}")
  missing = [k for k in references if k not in candidates]
  extra = [k for k in candidates if k not in references]
  if missing or extra:
    raise ValueError(f"cider_d: candidates and references must have the same ids; "
                     f"{len(missing)} without a candidate (first: {missing[:3]}), "
                     f"{len(extra)} without references (first: {extra[:3]})")
  if not references:
    raise ValueError("cider_d: no items to score")
  prep = coco_tokenize if tokenize else (lambda s: s)

  def counts(caption, key, what):
    if not isinstance(caption, str):
      raise TypeError(f"cider_d: {what} for item {key!r} must be a str, got "
                      f"{type(caption).__name__}")
    return _ngrams(prep(caption).split(), n)

  keys = list(references)
  ref_counts, cand_counts = [], []
  for key in keys:
    refs = references[key]
    if isinstance(refs, str) or not refs:
      raise ValueError(f"cider_d: item {key!r} needs a non-empty list of reference "
                       f"captions, got {refs!r}")
    ref_counts.append([counts(r, key, "a reference") for r in refs])
    cand_counts.append(counts(candidates[key], key, "the candidate"))

  doc_freq = collections.Counter()
  for refs in ref_counts:
    doc_freq.update(set().union(*refs))
  log_items = math.log(float(len(keys)))

  def vectorise(cnts):
    vec = [dict() for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in cnts.items():
      order = len(gram) - 1
      weight = float(tf) * (log_items - math.log(max(1.0, doc_freq[gram])))
      vec[order][gram] = weight
      norm[order] += weight * weight
      if order == 1:  # pycocoevalcap measures length in bigrams
        length += tf
    return vec, [math.sqrt(x) for x in norm], length

  def similarity(cand, ref):
    (v_c, n_c, l_c), (v_r, n_r, l_r) = cand, ref
    penalty = math.exp(-(float(l_c - l_r) ** 2) / (2 * sigma ** 2))
    out = []
    for order in range(n):
      val = 0.0
      for gram, w in v_c[order].items():
        w_r = v_r[order].get(gram, 0.0)
        val += min(w, w_r) * w_r  # clipping: CIDEr-D's guard against repetition
      if n_c[order] != 0 and n_r[order] != 0:
        val /= n_c[order] * n_r[order]
      out.append(val * penalty)
    return out

  per_item = {}
  for key, cand, refs in zip(keys, cand_counts, ref_counts):
    cand_vec = vectorise(cand)
    total = [0.0] * n
    for ref in refs:
      for order, s in enumerate(similarity(cand_vec, vectorise(ref))):
        total[order] += s
    per_item[key] = sum(total) / n / len(refs) * 10.0
  corpus = math.fsum(per_item.values()) / len(per_item)
  return CiderScores(corpus=corpus, per_item=per_item)
