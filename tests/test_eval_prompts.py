"""Few-shot prompts, shot selection (random, RICES) and the dataset readers."""
import json
import os

import numpy as np
import pytest

from flamingo_jax.evaluate import (build_prompt, ensemble_prompts, get_template,
                                   num_demonstrations, postprocess_generation,
                                   random_query_set, random_shots, read_class_names,
                                   read_classification_list, read_hateful_memes,
                                   read_image_folder, read_karpathy_captions, read_vqa,
                                   rices_shots, shot_orders)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

SHOTS_VQA = [{"image": "a.jpg", "question": "What color is the bus?", "answer": "red"},
             {"image": "b.jpg", "question": "How many cats?", "answer": "2"}]
QUERY_VQA = {"image": "q.jpg", "question": "Is it raining?"}
SHOTS_CAP = [{"image": "a.jpg", "caption": "A red bus."},
             {"image": "b.jpg", "caption": "Two cats on a bed."}]


def _fixture(name):
  return os.path.join(FIXTURES, name)


# ---------------------------------------------------------------------------- prompts


def test_paper_prompts():
  p = build_prompt(get_template("captioning"), SHOTS_CAP, {"image": "q.jpg"})
  assert p.text == ("<image>Output: A red bus.<EOC><image>Output: Two cats on a bed.<EOC>"
                    "<image>Output:")
  assert p.images == ("a.jpg", "b.jpg", "q.jpg")
  p = build_prompt(get_template("vqa"), SHOTS_VQA, QUERY_VQA)
  assert p.text == ("<image>Question: What color is the bus? Answer: red<EOC>"
                    "<image>Question: How many cats? Answer: 2<EOC>"
                    "<image>Question: Is it raining? Answer:")
  assert p.images == ("a.jpg", "b.jpg", "q.jpg")


def test_open_flamingo_prompts_and_markers():
  p = build_prompt(get_template("vqa", "open_flamingo"), SHOTS_VQA, QUERY_VQA,
                   eoc_marker="<|endofchunk|>")
  assert p.text == ("<image>Question:What color is the bus? Short answer:red<|endofchunk|>\n"
                    "<image>Question:How many cats? Short answer:2<|endofchunk|>\n"
                    "<image>Question:Is it raining? Short answer:")
  p = build_prompt(get_template("captioning", "open_flamingo"), SHOTS_CAP[:1],
                   {"image": "q.jpg"})
  assert p.text == "<image>Output:A red bus.<EOC>\n<image>Output:"
  p = build_prompt(get_template("hateful_memes", "open_flamingo"),
                   [{"image": "m1.png", "text": "hello there", "label": "no"}],
                   {"image": "m2.png", "text": "good morning"})
  assert p.text == ("<image>is an image with: 'hello there' written on it. Is it hateful? "
                    "Answer:no<EOC><image>is an image with: 'good morning' written on it. "
                    "Is it hateful? Answer:")
  assert p.images == ("m1.png", "m2.png")


def test_zero_shot_is_two_text_only_demonstrations():
  assert num_demonstrations(0) == 2 and num_demonstrations(4) == 4
  p = build_prompt(get_template("vqa"), SHOTS_VQA, QUERY_VQA, zero_shot=True)
  assert p.text == ("Question: What color is the bus? Answer: red<EOC>"
                    "Question: How many cats? Answer: 2<EOC>"
                    "<image>Question: Is it raining? Answer:")
  assert p.images == ("q.jpg",)
  assert p.text.count("<image>") == len(p.images)


def test_prompt_errors_name_the_problem():
  with pytest.raises(ValueError, match="shot 1 is missing field 'answer'"):
    build_prompt(get_template("vqa"), [SHOTS_VQA[0], {"image": "b", "question": "q"}],
                 QUERY_VQA)
  with pytest.raises(ValueError, match="query is missing field 'image'"):
    build_prompt(get_template("vqa"), SHOTS_VQA, {"question": "q"})
  with pytest.raises(TypeError, match="field 'caption' must be a str"):
    build_prompt(get_template("captioning"), [{"image": "a", "caption": ["x"]}],
                 {"image": "q"})
  with pytest.raises(ValueError, match="no prompt template for task 'vqa' in style"):
    get_template("vqa", "idefics")


def test_postprocess_generation():
  cap, vqa = get_template("captioning"), get_template("vqa", "open_flamingo")
  assert postprocess_generation(" A dog on a couch.<EOC><image>Output: x", cap) == \
      "A dog on a couch."
  assert postprocess_generation(" A dog Output: a cat", cap) == "A dog"
  assert postprocess_generation("yes Question:Is it", vqa) == "yes"
  assert postprocess_generation("2<|endofchunk|>", vqa, eoc_marker="<|endofchunk|>") == "2"


def test_ensemble_orders_are_distinct_and_start_with_the_given_order():
  assert len(shot_orders(2)) == 2 and len(shot_orders(3)) == 6
  for n, k in ((4, 6), (10, 6)):
    orders = shot_orders(n, k, seed=3)
    assert len(orders) == k and len(set(orders)) == k
    assert orders[0] == tuple(range(n))
    assert all(sorted(o) == list(range(n)) for o in orders)
  assert shot_orders(5, 6, seed=1) == shot_orders(5, 6, seed=1)
  assert shot_orders(0) == [()]
  shots = [{"image": f"{i}.jpg", "class_name": c} for i, c in enumerate(["tench", "goldfish"])]
  prompts = ensemble_prompts(get_template("classification"), shots,
                             {"image": "q.jpg"}, num_orders=6)
  assert [p.text for p in prompts] == [
      "<image>Output: tench<EOC><image>Output: goldfish<EOC><image>Output:",
      "<image>Output: goldfish<EOC><image>Output: tench<EOC><image>Output:"]
  assert [p.images for p in prompts] == [("0.jpg", "1.jpg", "q.jpg"),
                                         ("1.jpg", "0.jpg", "q.jpg")]


# ------------------------------------------------------------------- shot selection


def test_random_query_set_and_shots_are_fixed_by_seed():
  qs = random_query_set(10_000)
  assert qs.shape == (2048,) and len(set(qs.tolist())) == 2048
  assert qs.min() >= 0 and qs.max() < 10_000
  np.testing.assert_array_equal(qs, random_query_set(10_000, seed=42))
  assert not np.array_equal(qs, random_query_set(10_000, seed=0))
  shots = random_shots(qs, 8, query_index=5)
  assert len(set(shots.tolist())) == 8 and set(shots.tolist()) <= set(qs.tolist())
  np.testing.assert_array_equal(shots, random_shots(qs, 8, query_index=5))
  assert not np.array_equal(shots, random_shots(qs, 8, query_index=6))
  with pytest.raises(ValueError, match="size 2048 must be in"):
    random_query_set(100)
  with pytest.raises(ValueError, match="num_shots 3 must be"):
    random_shots([1, 2], 3, query_index=0)


def test_rices_picks_most_similar_last():
  support = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [2.0, 0.1]])
  queries = np.array([[1.0, 0.0], [0.0, 3.0]])
  # Query 0: cosine 1 (0), 0.9988 (4), 0.7071 (2), 0 (1), -1 (3).
  # Query 1: cosine 1 (1), 0.7071 (2), 0.0499 (4), 0 (0 and 3: tie -> 0 first).
  np.testing.assert_array_equal(rices_shots(support, queries, 3), [[2, 4, 0], [4, 2, 1]])
  np.testing.assert_array_equal(rices_shots(support, queries, 5),
                                [[3, 1, 2, 4, 0], [3, 0, 4, 2, 1]])
  assert rices_shots(support, queries, 0).shape == (2, 0)


def test_rices_matches_brute_force_across_blocks():
  rng = np.random.default_rng(0)
  support, queries = rng.normal(size=(300, 16)), rng.normal(size=(37, 16))
  got = rices_shots(support, queries, 7, block_size=8)
  s = support / np.linalg.norm(support, axis=1, keepdims=True)
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  want = np.argsort(-(q @ s.T), axis=1, kind="stable")[:, :7][:, ::-1]
  np.testing.assert_array_equal(got, want)


def test_rices_errors():
  with pytest.raises(ValueError, match="support features have 2 dims but query features 3"):
    rices_shots(np.ones((4, 2)), np.ones((1, 3)), 2)
  with pytest.raises(ValueError, match="row 1 is all zeros"):
    rices_shots(np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((1, 2)), 1)
  with pytest.raises(ValueError, match="num_shots 5 must be in"):
    rices_shots(np.ones((4, 2)), np.ones((1, 2)), 5)


# ---------------------------------------------------------------------------- datasets


def test_read_karpathy_coco_and_flickr():
  coco = _fixture("eval_karpathy_coco.json")
  test = read_karpathy_captions(coco, "test", image_root="/data/coco")
  assert [e.image_id for e in test] == [391895, 60623]
  assert test[0].image_path == "/data/coco/val2014/COCO_val2014_000000391895.jpg"
  assert test[0].captions == ("A man riding a bike.", "A cyclist on a dirt road.")
  assert test[0].prompt_fields() == {"image": test[0].image_path,
                                     "caption": "A man riding a bike."}
  train = read_karpathy_captions(coco, ("train", "restval"))
  assert [(e.image_id, e.split) for e in train] == [(522418, "restval"), (57870, "train")]
  flickr = read_karpathy_captions(_fixture("eval_karpathy_flickr30k.json"), "train", "imgs")
  assert [(e.image_id, e.image_path) for e in flickr] == [(0, "imgs/1000092795.jpg")]
  with pytest.raises(ValueError, match="unknown split"):
    read_karpathy_captions(coco, "testing")


def test_read_vqa_and_prompt_fields():
  examples = read_vqa(_fixture("eval_vqa_questions.json"),
                      _fixture("eval_vqa_annotations.json"), image_root="/coco/val2014")
  assert len(examples) == 20
  e = examples[5]
  assert e.question_id == 1006 and e.question_type == "is the" and e.answer_type == "yes/no"
  assert e.image_path == "/coco/val2014/COCO_val2014_000000000012.jpg"
  assert len(e.answers) == 10
  assert e.prompt_fields() == {"image": e.image_path, "question": "Is the man happy?",
                               "answer": "no"}
  assert e.prompt_fields(answer="first")["answer"] == "yes"
  unlabeled = read_vqa(_fixture("eval_vqa_questions.json"), image_naming="id_jpg")
  assert unlabeled[0].answers == () and unlabeled[0].image_path == "9.jpg"
  assert "answer" not in unlabeled[0].prompt_fields()


def _write(tmp_path, name, obj):
  path = tmp_path / name
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
  return str(path)


def test_readers_name_the_file_and_the_missing_field(tmp_path):
  bad = _write(tmp_path, "karpathy.json", {"images": [{"filename": "x.jpg", "split": "test"}]})
  with pytest.raises(ValueError, match=r"karpathy.json: images\[0\] is missing field "
                                       r"'sentences'"):
    read_karpathy_captions(bad, "test")
  bad = _write(tmp_path, "karpathy2.json", {"images": [
      {"filename": "x.jpg", "split": "test", "imgid": 0, "sentences": [{"tokens": []}]}]})
  with pytest.raises(ValueError, match=r"images\[0\].sentences\[0\] is missing field 'raw'"):
    read_karpathy_captions(bad, "test")
  with pytest.raises(ValueError, match="the top level is missing field 'images'"):
    read_karpathy_captions(_write(tmp_path, "k3.json", {"imgs": []}), "test")
  with pytest.raises(FileNotFoundError, match="nope.json"):
    read_karpathy_captions(str(tmp_path / "nope.json"), "test")

  q = _write(tmp_path, "q.json", {"data_subtype": "val2014", "questions": [
      {"question_id": 1, "image_id": 3, "question": "Why?"}, {"question_id": 2, "image_id": 3}]})
  with pytest.raises(ValueError, match=r"q.json: questions\[1\] is missing field 'question'"):
    read_vqa(q)
  q = _write(tmp_path, "q2.json", {"questions": [
      {"question_id": 1, "image_id": 3, "question": "Why?"}]})
  with pytest.raises(ValueError, match="missing field 'data_subtype'"):
    read_vqa(q)
  a = _write(tmp_path, "a.json", {"annotations": [{"question_id": 7, "answers": [
      {"answer": "x"}]}]})
  with pytest.raises(ValueError, match="a.json: no annotation for question_id 1"):
    read_vqa(q, a, image_naming="filename")
  a = _write(tmp_path, "a2.json", {"annotations": [{"question_id": 1, "answers": [
      {"answer_id": 1}]}]})
  with pytest.raises(ValueError, match=r"annotations\[0\].answers\[0\] is missing field "
                                       r"'answer'"):
    read_vqa(q, a, image_naming="filename")

  memes = _write(tmp_path, "m.jsonl", '{"id": 1, "img": "img/1.png", "text": "hi"}\n')
  with pytest.raises(ValueError, match="m.jsonl: line 1 is missing field 'label'"):
    read_hateful_memes(memes)
  assert read_hateful_memes(memes, require_labels=False)[0].label is None
  memes = _write(tmp_path, "m2.jsonl", '{"id": 1, "img": "a.png", "text": "hi", "label": 0}\n{')
  with pytest.raises(ValueError, match="m2.jsonl: line 2 is not valid JSON"):
    read_hateful_memes(memes)


def test_read_hateful_memes():
  memes = read_hateful_memes(_fixture("eval_hateful_memes.jsonl"), "/hm")
  assert [(m.id, m.label) for m in memes] == [(10001, 0), (10002, 1), (10003, 0)]
  assert memes[0].image_path == "/hm/img/10001.png"
  assert memes[1].prompt_fields() == {"image": "/hm/img/10002.png",
                                      "text": "fixture text for a positive example",
                                      "label": "yes"}


def test_read_image_folder_and_class_lists(tmp_path):
  root = tmp_path / "val"
  for wnid, files in {"n02": ["b.JPEG", "a.JPEG", "notes.txt"], "n01": ["c.JPEG"]}.items():
    (root / wnid).mkdir(parents=True)
    for f in files:
      (root / wnid / f).write_bytes(b"")
  examples = read_image_folder(str(root), {"n01": "tench", "n02": "goldfish"})
  assert [(os.path.basename(e.image_path), e.label, e.class_name) for e in examples] == [
      ("c.JPEG", 0, "tench"), ("a.JPEG", 1, "goldfish"), ("b.JPEG", 1, "goldfish")]
  assert read_image_folder(str(root))[0].class_name == "n01"
  with pytest.raises(ValueError, match="2 classes but 3 class names"):
    read_image_folder(str(root), ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"class_names has no entry for \['n02'\]"):
    read_image_folder(str(root), {"n01": "tench"})

  names_txt = _write(tmp_path, "names.txt", "tench\ngoldfish\n")
  names_json = _write(tmp_path, "names.json", {"1": "goldfish", "0": "tench"})
  assert read_class_names(names_txt) == read_class_names(names_json) == ("tench", "goldfish")
  listing = _write(tmp_path, "val.json", [{"image": "x/1.jpg", "label": 1}])
  ex = read_classification_list(listing, ("tench", "goldfish"), image_root="/in")
  assert ex[0].image_path == "/in/x/1.jpg" and ex[0].class_name == "goldfish"
  assert ex[0].prompt_fields() == {"image": "/in/x/1.jpg", "class_name": "goldfish"}
  bad = _write(tmp_path, "val2.json", [{"image": "x/1.jpg", "label": 2}])
  with pytest.raises(ValueError, match="val2.json: entry 0 label 2 is outside"):
    read_classification_list(bad, ("tench", "goldfish"))
  bad = _write(tmp_path, "val3.json", [{"image": "x/1.jpg", "label": "1"}])
  with pytest.raises(ValueError, match="entry 0 field 'label' should be int"):
    read_classification_list(bad, ("tench", "goldfish"))


def test_custom_template_is_checked_against_the_task_fields():
  from flamingo_jax.evaluate.prompts import custom_template
  t = custom_template("classification", "a {class_name}")
  assert t.labels == ("a",) and t.answer_field == "class_name"
  assert custom_template("vqa", "Q: {question} A: {answer}").fields == ("question", "answer")
  with pytest.raises(ValueError, match="end with {answer}"):
    custom_template("vqa", "{answer} then {question}")
  with pytest.raises(ValueError, match="must end with its answer slot"):
    custom_template("captioning", "{caption} is it")
  with pytest.raises(ValueError, match="unknown \\['colour'\\]"):
    custom_template("classification", "{colour} {class_name}")
