"""The shapes world's documents and the name-binding task (fast: no model trained)."""
import collections
import dataclasses
import os

import numpy as np
import pytest

from flamingo_jax.data import shapes
from flamingo_jax.evaluate import names


def _docs(kind, n=40, seed=0):
  rng = np.random.default_rng(seed)
  return [shapes.document(rng, 8, kind=kind) for _ in range(n)]


def test_gallery_and_quiz_texts_describe_the_picture_just_before_them():
  for kind in ("gallery", "quiz"):
    for texts, scenes in _docs(kind):
      assert 2 <= sum(s is not None for s in scenes) <= 8
      for j in range(0, len(texts), 2):  # picture, then its text
        scene, text = scenes[j], texts[j + 1]
        assert scene is not None and texts[j] is None and scenes[j + 1] is None
        if kind == "gallery":
          assert text == shapes.caption(scene)
        else:
          q, a = text[len("Question: "):].split(" Answer: ")
          assert (q, a) in [(x, y) for x, y, _ in shapes.questions(scene)]


def test_naming_documents_bind_names_to_kinds_afresh_per_document():
  bindings = set()
  for texts, scenes in _docs("names", n=60):
    seen = {}
    for scene, text in zip(scenes[0::2], texts[1::2]):
      (shape,) = scene
      name = text[len(shapes.naming_text("")):]
      assert name in shapes.NAMES
      assert seen.setdefault(shape.kind, name) == name  # one name per kind in a document
    assert len(set(seen.values())) == len(seen)  # distinct kinds get distinct names
    bindings.add(tuple(sorted(seen.items())))
  assert len(bindings) > 30  # the names change from document to document


def test_unknown_document_kind_is_named():
  with pytest.raises(ValueError, match="document kind must be one of"):
    shapes.document(np.random.default_rng(0), kind="poem")


@dataclasses.dataclass
class _Ex:
  image_path: str
  class_name: str


def test_episodes_are_balanced_and_the_answer_is_the_query_kinds_name():
  support = [_Ex(f"s{i}.png", f"{c} {k}") for i, (c, k) in enumerate(
      [(c, k) for c in shapes.COLOURS for k in shapes.SHAPES] * 3)]
  test = [_Ex(f"t{i}.png", f"red {shapes.SHAPES[i % 3]}") for i in range(90)]
  queries = np.arange(len(test))
  for n in (0, 4, 8):
    eps = names.episodes(support, test, queries, n, seed=0)
    assert eps == names.episodes(support, test, queries, n, seed=0)  # deterministic
    first_kinds = collections.Counter()
    for e, q in zip(eps, queries):
      counts = collections.Counter(k for _, k in e["shots"])
      assert len(e["shots"]) == (2 if n == 0 else n)
      assert max(counts.values()) - min(counts.values()) <= 1  # no kind favoured
      if n >= 3:
        assert set(counts) == set(shapes.SHAPES)
      assert e["answer"] == e["binding"][test[q].class_name.split()[-1]]
      assert len(set(e["binding"].values())) == 3
      for path, kind in e["shots"]:
        assert next(s for s in support if s.image_path == path).class_name.endswith(kind)
      first_kinds[e["binding"]["circle"]] += 1
    assert len(first_kinds) > 10  # the circle's name changes from prompt to prompt
  assert names.CHANCE == pytest.approx(100 / 3)


def _ev(offset):
  res = {m: {"captions": {"0": 10.0 + offset, "4": 20.0 + offset}} for m in ("flamingo",
                                                                            "gates_zero")}
  return {"results": res, "metrics": {"captions": "CIDEr"}, "shots": [0, 4],
          "chance": {"captions": 5.0},
          "names": {"metric": "top-1", "chance": names.CHANCE,
                    "results": {m: {"0": 30.0, "4": 60.0 + offset} for m in res}}}


def test_seeds_table_gives_mean_and_range_and_the_names_task_joins_the_tasks():
  from flamingo_jax.apps.demo import report
  table = report.seeds_table({0: _ev(0.0), 1: _ev(2.0), 2: _ev(4.0)})
  assert "over 3 seeds (0, 1, 2)" in table
  assert "| captions | CIDEr | flamingo | 12.0 [10.0, 14.0] | 22.0 [20.0, 24.0] |" in table
  assert "| names | top-1 | flamingo | 30.0 [30.0, 30.0] | 62.0 [60.0, 64.0] |" in table
  assert "| names | top-1 | chance | 33.3 | 33.3 |" in table
  assert report.margins(_ev(0.0))["names"]["over_chance"] == pytest.approx(60 - 100 / 3)
  # The ablations read run_eval's three tasks only: names stays apart there.
  assert set(_ev(0.0)["metrics"]) == {"captions"}


def test_seeds_plot_draws_each_models_mean_and_range(tmp_path):
  from flamingo_jax.apps.demo import report
  evs = {0: _ev(0.0), 1: _ev(2.0), 2: _ev(4.0)}
  views = [report.with_names(ev) for ev in evs.values()]
  mean, lo, hi = report.seed_spread(views, "flamingo", "names")
  assert mean.tolist() == [30.0, 62.0] and lo.tolist() == [30.0, 60.0]
  assert hi.tolist() == [30.0, 64.0]
  path = report.write_seeds_plot({"out": str(tmp_path)}, evs)
  assert path == str(tmp_path / "shots_seeds.png") and os.path.getsize(path) > 10_000


def test_seeds_option_names_bad_input(capsys):
  from flamingo_jax.apps.demo import stages as demo
  from flamingo_jax.errors import run_cli
  for bad, msg in (("0,x", "comma-separated integers"), ("1,1", "distinct integers")):
    assert run_cli(demo.main, ["--workdir", "/nonexistent/x", "--seeds", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err


def test_words_prompt_is_the_episode_with_each_picture_in_words():
  support = [_Ex(f"s{i}.png", f"{c} {k}") for i, (c, k) in enumerate(
      [(c, k) for c in shapes.COLOURS for k in shapes.SHAPES])]
  test = [_Ex("t0.png", "blue square")]
  (e,) = names.episodes(support, test, np.array([0]), 4, seed=3)
  text = names.words_prompt(e, zero_shot=False)
  parts = [f"a {c} This is a {e['binding'][k]}" for c, (_, k) in
           zip(e["shot_classes"], e["shots"])]
  assert text == " ".join(parts + ["a blue square This is a"])
  assert all(c.endswith(k) for c, (_, k) in zip(e["shot_classes"], e["shots"]))
  assert e["answer"] == e["binding"]["square"] and e["answer"] not in text.split()[-5:]
  (z,) = names.episodes(support, test, np.array([0]), 0, seed=3)
  zero = names.words_prompt(z, zero_shot=True)  # text-only demonstrations: no classes
  assert not any(k in zero.rsplit("a blue square", 1)[0] for k in shapes.SHAPES)
