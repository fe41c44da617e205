"""Few-shot prompts: demonstrations and a query as text with `<image>` markers.

Pure functions on strings and example dicts (the `prompt_fields()` of the
records in `datasets`), so the exact prompt a score came from can be tested
and logged. A prompt is each shot rendered as

    <image>{template with its answer}<EOC>

followed by the query rendered up to its answer slot ("<image>Output:"), and
the images in the order of their markers: the shots', then the query's.

* Templates: the paper's ("Output: {caption}", "Question: {question} Answer:
  {answer}") or OpenFlamingo's ("Output:{caption}", "Question:{question}
  Short answer:{answer}", each captioning / VQA shot followed by "\n" as in its
  evaluate.py), chosen by `style`.
* Zero-shot (paper and OpenFlamingo): two text-only demonstrations, their
  `<image>` markers and images left out; only the query has an image.
* Shots: random from a fixed query set (`random_query_set`, 2048 examples,
  seed 42), or by similarity (`rices.rices_shots`, most similar last).
* Prompt ensembling (close-ended tasks): the same shots in several orders;
  average the options' log-likelihoods over the orders.

The query ends right after the answer label's colon with no trailing space,
so the model writes the space itself, as it read it in the demonstrations.
`<BOS>` is the tokenizer's business and is not part of the text.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import string
from typing import Any, Mapping, Sequence

import numpy as np

IMAGE_MARKER = "<image>"
EOC_MARKER = "<EOC>"
ZERO_SHOT_DEMONSTRATIONS = 2
QUERY_SET_SIZE = 2048
SEED = 42


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """One example's text after its `<image>`: `{field}` slots, the answer slot last."""
  task: str
  style: str
  text: str

  def __post_init__(self):
    fields = self.fields
    if not fields or not self.text.endswith("{" + fields[-1] + "}"):
      raise ValueError(f"template {self.text!r} must end with its answer slot, e.g. "
                       "'Output: {caption}'")

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(f for _, f, _, _ in string.Formatter().parse(self.text) if f)

  @property
  def answer_field(self) -> str:
    return self.fields[-1]

  @property
  def labels(self) -> tuple[str, ...]:
    """The template's literal pieces ("Question:", "Answer:"), stripped."""
    return tuple(t.strip() for t, _, _, _ in string.Formatter().parse(self.text)
                 if t.strip())

  def render(self, example: Mapping[str, Any], *, with_answer: bool,
             image_marker: str = IMAGE_MARKER, eoc_marker: str = EOC_MARKER,
             with_image: bool = True, what: str = "example") -> str:
    """One demonstration (with_answer) or the query (without), markers included."""
    needed = self.fields if with_answer else self.fields[:-1]
    values = {}
    for f in needed:
      if f not in example:
        raise ValueError(f"{what} is missing field {f!r} needed by the {self.task}/"
                         f"{self.style} template {self.text!r}")
      if not isinstance(example[f], str):
        raise TypeError(f"{what} field {f!r} must be a str, got "
                        f"{type(example[f]).__name__}: {example[f]!r}")
      values[f] = example[f]
    prefix = image_marker if with_image else ""
    if with_answer:
      return prefix + self.text.format(**values) + eoc_marker
    cut = self.text[:-len("{" + self.answer_field + "}")]
    return prefix + cut.format(**values).rstrip(" ")


_TEMPLATES = {
    ("captioning", "flamingo"): "Output: {caption}",
    ("captioning", "open_flamingo"): "Output:{caption}",
    ("vqa", "flamingo"): "Question: {question} Answer: {answer}",
    ("vqa", "open_flamingo"): "Question:{question} Short answer:{answer}",
    ("classification", "flamingo"): "Output: {class_name}",
    ("classification", "open_flamingo"): "Output:{class_name}",
    ("hateful_memes", "flamingo"):
        'is an image with written: "{text}" on it. Is it hateful? Answer: {label}',
    ("hateful_memes", "open_flamingo"):
        "is an image with: '{text}' written on it. Is it hateful? Answer:{label}",
}
TASKS = tuple(sorted({t for t, _ in _TEMPLATES}))
STYLES = ("flamingo", "open_flamingo")
# Text after each demonstration: OpenFlamingo's evaluate.py ends every captioning and VQA
# shot with "\n" (classification and hateful memes shots with nothing).
SHOT_SEPARATORS = {("captioning", "open_flamingo"): "\n", ("vqa", "open_flamingo"): "\n"}


# The answer slot each task's template must end with, and the fields its
# examples provide (datasets.*.prompt_fields).
ANSWER_FIELDS = {"captioning": "caption", "vqa": "answer", "classification": "class_name",
                 "hateful_memes": "label"}
EXAMPLE_FIELDS = {"captioning": ("caption",), "vqa": ("question", "answer"),
                  "classification": ("class_name",), "hateful_memes": ("text", "label")}


def custom_template(task: str, text: str) -> PromptTemplate:
  """A user's template for `task` (eval config `template`), checked against the
  fields the task's examples have and its answer slot."""
  if task not in ANSWER_FIELDS:
    raise ValueError(f"no prompt template for task {task!r}; tasks: {TASKS}")
  template = PromptTemplate(task, "custom", text)
  unknown = [f for f in template.fields if f not in EXAMPLE_FIELDS[task]]
  if unknown or template.answer_field != ANSWER_FIELDS[task]:
    raise ValueError(f"template {text!r} for {task}: slots must come from "
                     f"{list(EXAMPLE_FIELDS[task])} and end with {{{ANSWER_FIELDS[task]}}}"
                     f"{f'; unknown {unknown}' if unknown else ''}")
  return template


def get_template(task: str, style: str = "flamingo") -> PromptTemplate:
  """The template for `task` in `style` ("flamingo": the paper's; "open_flamingo")."""
  if (task, style) not in _TEMPLATES:
    raise ValueError(f"no prompt template for task {task!r} in style {style!r}; tasks: "
                     f"{TASKS}, styles: {STYLES}")
  return PromptTemplate(task, style, _TEMPLATES[(task, style)])


@dataclasses.dataclass(frozen=True)
class Prompt:
  """The prompt text and its images, one per `<image>` marker, in marker order."""
  text: str
  images: tuple


def num_demonstrations(num_shots: int) -> int:
  """How many demonstrations an n-shot prompt holds: zero-shot uses two, text-only."""
  if num_shots < 0:
    raise ValueError(f"num_shots must be >= 0, got {num_shots}")
  return ZERO_SHOT_DEMONSTRATIONS if num_shots == 0 else num_shots


def build_prompt(template: PromptTemplate, shots: Sequence[Mapping[str, Any]],
                 query: Mapping[str, Any], *, zero_shot: bool = False,
                 image_marker: str = IMAGE_MARKER,
                 eoc_marker: str = EOC_MARKER) -> Prompt:
  """Shots then the query, as text and the ordered list of images.

  shots: example dicts with every template field (answer included) and
    "image" (any object: a path, an array); in prompt order.
  query: the example to answer: the template fields but the answer, and "image".
  zero_shot: render the shots without `<image>` and drop their images (the
    paper's zero-shot protocol; pass `num_demonstrations(0)` == 2 shots).
  """
  parts, images = [], []
  separator = SHOT_SEPARATORS.get((template.task, template.style), "")
  for i, shot in enumerate(shots):
    parts.append(template.render(shot, with_answer=True, image_marker=image_marker,
                                 eoc_marker=eoc_marker, with_image=not zero_shot,
                                 what=f"shot {i}") + separator)
    if not zero_shot:
      images.append(_image(shot, f"shot {i}"))
  parts.append(template.render(query, with_answer=False, image_marker=image_marker,
                               eoc_marker=eoc_marker, what="query"))
  images.append(_image(query, "query"))
  return Prompt(text="".join(parts), images=tuple(images))


def _image(example: Mapping[str, Any], what: str):
  if "image" not in example:
    raise ValueError(f"{what} is missing field 'image'")
  return example["image"]


def shot_orders(num_shots: int, num_orders: int = 6, seed: int = 0) -> list[tuple[int, ...]]:
  """Distinct orders of the shots for prompt ensembling, the given order first.

  min(num_orders, num_shots!) permutations; the rest are drawn without
  repetition with `seed` (OpenFlamingo draws 6 shuffles that may repeat).
  """
  if num_shots < 0 or num_orders < 1:
    raise ValueError(f"shot_orders: need num_shots >= 0 and num_orders >= 1, got "
                     f"{num_shots} and {num_orders}")
  count = min(num_orders, math.factorial(num_shots))
  identity = tuple(range(num_shots))
  if num_shots <= 8:  # enumerate and sample: exact and cheap up to 8! = 40320
    others = [p for p in itertools.permutations(identity) if p != identity]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(others), size=count - 1, replace=False) if count > 1 else []
    return [identity] + [others[i] for i in picks]
  rng = np.random.default_rng(seed)
  orders, seen = [identity], {identity}
  while len(orders) < count:
    p = tuple(int(i) for i in rng.permutation(num_shots))
    if p not in seen:
      seen.add(p)
      orders.append(p)
  return orders


def ensemble_prompts(template: PromptTemplate, shots: Sequence[Mapping[str, Any]],
                     query: Mapping[str, Any], *, num_orders: int = 6, seed: int = 0,
                     **kwargs) -> list[Prompt]:
  """`build_prompt` for each of `shot_orders(len(shots), num_orders, seed)`."""
  return [build_prompt(template, [shots[i] for i in order], query, **kwargs)
          for order in shot_orders(len(shots), num_orders, seed)]


def random_query_set(num_examples: int, size: int = QUERY_SET_SIZE,
                     seed: int = SEED) -> np.ndarray:
  """[size] distinct indices into the training set: the pool random shots come from.

  Fixed per seed, so every test example and every shot count draws from the
  same 2048 examples (the protocol of Flamingo and OpenFlamingo).
  """
  if not 0 < size <= num_examples:
    raise ValueError(f"random_query_set: size {size} must be in [1, {num_examples}] "
                     f"(the number of training examples)")
  return np.random.default_rng(seed).choice(num_examples, size=size, replace=False)


def random_shots(query_set: Sequence[int], num_shots: int, query_index: int, *,
                 seed: int = SEED) -> np.ndarray:
  """[num_shots] distinct training indices from `query_set` for one test example.

  Seeded by (seed, query_index), so a test example gets the same shots
  whatever the batch size, order or number of hosts.
  """
  pool = np.asarray(query_set)
  if not 0 <= num_shots <= pool.size:
    raise ValueError(f"random_shots: num_shots {num_shots} must be in [0, {pool.size}] "
                     f"(the query set size)")
  if int(query_index) < 0:
    raise ValueError(f"random_shots: query_index must be >= 0, got {query_index}")
  rng = np.random.default_rng([seed, int(query_index)])
  return pool[rng.choice(pool.size, size=num_shots, replace=False)]


def postprocess_generation(text: str, template: PromptTemplate, *,
                           image_marker: str = IMAGE_MARKER,
                           eoc_marker: str = EOC_MARKER) -> str:
  """The answer in a generated continuation: cut at `<EOC>`, `<image>` or the
  start of a new demonstration (any of the template's labels), stripped."""
  cut = len(text)
  for stop in (eoc_marker, image_marker) + template.labels:
    i = text.find(stop)
    if i != -1:
      cut = min(cut, i)
  return text[:cut].strip()

