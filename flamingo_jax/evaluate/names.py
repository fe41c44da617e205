"""Name binding: a task only the demonstrations can answer (the demo's shapes world).

Every prompt gives the three shape kinds fresh made-up names (`shapes.NAMES`,
`shapes.name_binding`) and shows them only in its shots:

    <image>This is a blicket<EOC><image>This is a dax<EOC>...<image>This is a

where blicket is this prompt's circle and dax its square; the query is a
held-out picture of one shape (of any colour), and the three names of the
prompt are the options, ranked by mean log-likelihood per token (as
classification is). The shots' kinds are balanced (each kind shown
floor(n/3) or ceil(n/3) times) and the query's kind is drawn independently,
so a model that does not look at the images (the LM alone, gates at 0) or
that only copies the most frequent name scores 1/3: chance. At 0 shots the
prompt holds two text-only demonstrations (the paper's zero-shot protocol),
so the binding cannot be known and the score is chance too.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from flamingo_jax.data import shapes
from flamingo_jax.evaluate import prompts
from flamingo_jax.evaluate.config import EvalConfig
from flamingo_jax.evaluate.inputs import (continuation_ids, encode_prompt, load_image,
                                          load_task_data)
from flamingo_jax.evaluate.run import select_queries
from flamingo_jax.evaluate.scoring import Scorer
from flamingo_jax.models.config import FlamingoConfig

log = logging.getLogger(__name__)

TEMPLATE = prompts.PromptTemplate("names", "custom", shapes.naming_text("{name}"))
METRIC = "top-1"
CHANCE = 100.0 / len(shapes.SHAPES)  # three names per prompt


def _kind(ex) -> str:
  return ex.class_name.split()[-1]  # "red circle" -> "circle"


def episodes(support: Sequence, test: Sequence, queries: np.ndarray, num_shots: int,
             seed: int) -> list[dict]:
  """Per query: its binding {kind: name}, shots [(image path, kind)], answer name.

  Seeded by (seed, query index, shots): the same query gets the same episode
  whatever the batch; the support and test sets are one-shape pictures.
  """
  by_kind = {k: [i for i, ex in enumerate(support) if _kind(ex) == k] for k in shapes.SHAPES}
  missing = [k for k, v in by_kind.items() if not v]
  if missing:
    raise ValueError(f"name binding: the support set has no picture of {missing}")
  out = []
  for q in queries:
    rng = np.random.default_rng([seed, int(q), num_shots])
    binding = shapes.name_binding(rng)
    n = prompts.num_demonstrations(num_shots)
    kinds = [shapes.SHAPES[int(i)] for r in range(-(-n // len(shapes.SHAPES)))
             for i in rng.permutation(len(shapes.SHAPES))][:n]
    kinds = [kinds[int(i)] for i in rng.permutation(n)]
    picks = [support[int(rng.choice(by_kind[k]))] for k in kinds]
    out.append({"binding": binding, "shots": [(ex.image_path, k) for ex, k in zip(picks, kinds)],
                "shot_classes": [ex.class_name for ex in picks],
                "query": test[int(q)].image_path, "query_class": test[int(q)].class_name,
                "answer": binding[_kind(test[int(q)])]})
  return out


def words_prompt(episode: dict, zero_shot: bool) -> str:
  """The episode in words, every picture replaced by its class ("a red circle"): what
  the frozen LM alone would need to bind in context for the pictures to be answerable.

  Texts joined by spaces, as the LM's corpus joins a document's texts; at 0 shots the
  shots' texts alone (the zero-shot protocol's text-only demonstrations).
  """
  shots = [(c, episode["binding"][k]) for c, (_, k) in zip(episode["shot_classes"],
                                                          episode["shots"])]
  parts = [(shapes.naming_text(n) if zero_shot else f"a {c} {shapes.naming_text(n)}")
           for c, n in shots]
  return " ".join(parts + [f"a {episode['query_class']} {TEMPLATE.text[:-len('{name}')]}"
                           .rstrip(" ")])


def evaluate_names(config: FlamingoConfig, ec: EvalConfig, params, tokenizer, *,
                   classes_task: str, shots: Sequence[int], num_samples: int,
                   label: str = "", words: bool = False) -> dict:
  """{"metric", "chance", "shots": {n: top-1 %}}: the eval section's classification
  task `classes_task` supplies the pictures (its support and held-out lists).

  words: the same episodes with every picture given in words (`words_prompt`) and no
  image, scored by the LM alone: the binding the frozen LM can do by itself.
  """
  support, test, _ = load_task_data(ec.tasks[classes_task])
  queries = select_queries(len(test), num_samples, ec.seed)
  info = tokenizer.info
  scorer = Scorer(config, batch_size=ec.batch_size, prompt_buckets=ec.prompt_buckets,
                  pad_token_id=info.pad_id)
  context = TEMPLATE.text[:-len("{name}")].rstrip(" ")
  option_ids = [continuation_ids(tokenizer, context, " " + name)
                for name in shapes.NAMES]
  size, mean, std = config.vision.image_size, tuple(ec.image_mean), tuple(ec.image_std)
  scores = {}
  for num_shots in shots:
    eps = episodes(support, test, queries, num_shots, ec.seed)
    if words:
      ids = [encode_prompt(words_prompt(e, num_shots == 0), tokenizer) for e in eps]
      images = None
    else:
      built = [prompts.build_prompt(
          TEMPLATE, [{"name": e["binding"][k], "image": path} for path, k in e["shots"]],
          {"image": e["query"]}, zero_shot=num_shots == 0) for e in eps]
      ids = [encode_prompt(p.text, tokenizer) for p in built]
      images = [np.stack([load_image(path, size, mean, std) for path in p.images])
                for p in built]
    s = scorer(params, ids, option_ids, images)  # [Q, len(NAMES)]
    allowed = np.full(s.shape, -np.inf)
    for row, e in zip(allowed, eps):
      for name in e["binding"].values():
        row[shapes.NAMES.index(name)] = 0.0
    picks = np.argmax(s + allowed, axis=1)
    correct = [shapes.NAMES[int(p)] == e["answer"] for p, e in zip(picks, eps)]
    scores[str(num_shots)] = 100.0 * float(np.mean(correct))
    log.info("%snames%s %d-shot: %s %.2f", label, " in words" if words else "", num_shots,
             METRIC, scores[str(num_shots)])
  return {"metric": METRIC, "chance": CHANCE, "shots": scores,
          "num_examples": int(len(queries))}
