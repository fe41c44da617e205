"""The evaluation CLI as users run it: a model directory + configs/eval/* on small files
laid out exactly like the released datasets -> results, predictions, resume, trials, mesh."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flamingo_jax import model_dir
from flamingo_jax.evaluate import cli
from flamingo_jax.evaluate.config import (EvalConfig, EvalTaskConfig, compose, eval_config,
                                          protocol, validate_task)
from flamingo_jax.evaluate.inputs import load_task_data
from eval_files import (CAPTIONS, QUESTIONS, make_coco, make_hateful_memes, make_imagenet,
                        make_textvqa, make_vizwiz, make_vqa)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(REPO, "configs", "eval")
GREEDY = ["--config.eval.decode_method=greedy", "--config.eval.batch_size=2",
          "--config.eval.prompt_buckets=(128,)", "--no_progress"]


def _short(*tasks):
  """Every task at 5 new tokens, so the runs share one compiled decoder."""
  return [f"--config.eval.tasks.{t}.max_new_tokens=5" for t in tasks]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
  """Every benchmark's files in its released layout, and the exported tiny model."""
  root = tmp_path_factory.mktemp("eval")
  data = root / "data"
  make_coco(str(data / "coco"))
  make_vqa(str(data / "vqav2"), "v2_OpenEnded_mscoco_{}_questions.json",
           "v2_mscoco_{}_annotations.json")
  make_vqa(str(data / "ok_vqa"), "OpenEnded_mscoco_{}_questions.json",
           "mscoco_{}_annotations.json")
  make_textvqa(str(data / "textvqa"))
  make_vizwiz(str(data / "vizwiz"))
  make_hateful_memes(str(data / "hateful_memes"))
  make_imagenet(str(data / "imagenet"))
  directory, config = tiny_model_dir
  return dict(root=root, data=data, model=directory, config=config)


def _eval(name, world):
  return f"{EVAL}/{name}.py:{world['data'] / name}"


def _run(world, out, *args):
  return cli.main(["--checkpoint", world["model"], "--out", str(out), *args])


def test_every_benchmark_in_one_command(world, tmp_path):
  """Captioning and the four VQA formats from their released files, composed in one run;
  predictions carry their references, results.md states the decoding used, and
  results_open_flamingo.json has OpenFlamingo's layout."""
  out = tmp_path / "out"
  evals = ["coco", "vqav2", "ok_vqa", "textvqa", "vizwiz"]
  report = _run(world, out, *[a for n in evals for a in ("--eval", _eval(n, world))],
                "--shots", "1", "--config.eval.tasks.ok_vqa.answer_postprocess=vqa",
                *_short("coco", "textvqa"), *GREEDY)
  assert report["tasks"] == evals and report["shots"] == [1]
  for name in evals:
    entry = report["results"][name]
    assert entry["num_examples"] == 2 and entry["seeds"] == [42]
    run = entry["shots"]["1"]
    assert np.isfinite(run["score"]) and run["examples_per_s"] > 0 and run["stddev"] == 0
    rows = json.loads((out / "predictions" / f"{name}_1shot.json").read_text())
    assert len(rows) == 2 and all(len(r["shots"]) == 1 for r in rows)
    key = "references" if name == "coco" else "answers"
    assert all(len(r[key]) >= 2 and isinstance(r["prediction"], str) for r in rows)
  coco = json.loads((out / "predictions" / "coco_1shot.json").read_text())
  assert {r["id"] for r in coco} == {5, 6}  # cocoid of the Karpathy test images
  assert coco[0]["references"] == [CAPTIONS[4], CAPTIONS[5]]
  assert all(r["shots"][0] in (0, 1, 2) for r in coco)  # train + restval demonstrations
  table = (out / "results.md").read_text()
  assert "| vizwiz | VQA acc. |" in table
  assert "- coco: 2 examples; greedy, at most 5 new tokens, stop at <EOC>; 1 trial (seed 42)." \
      in table
  assert "- vqav2: 2 examples; greedy, at most 5 new tokens, stop at <EOC>, answers " \
      "post-processed 'vqa'" in table
  of = json.loads((out / "results_open_flamingo.json").read_text())
  assert sorted(of) == sorted(evals)
  assert of["coco"] == [{"shots": 1, "trials": [report["results"]["coco"]["shots"]["1"]["score"]],
                         "mean": report["results"]["coco"]["shots"]["1"]["score"],
                         "stddev": 0.0}]


def test_benchmark_configs_follow_the_protocol(world):
  """Each configs/eval file: the paper's shots, beam 3, OpenFlamingo's token limits and
  answer post-processing, every path under the one data root."""
  cfg, order = compose(eval_files=[_eval(n, world) for n in (
      "coco", "flickr30", "vqav2", "ok_vqa", "textvqa", "vizwiz", "hateful_memes",
      "imagenet")])
  ec = eval_config(cfg)
  assert order == ["coco", "flickr30", "vqav2", "ok_vqa", "textvqa", "vizwiz",
                   "hateful_memes", "imagenet"]
  assert (ec.decode_method, ec.num_beams, ec.length_penalty) == ("beam", 3, 0.0)
  limits = {"coco": 20, "flickr30": 20, "vqav2": 5, "ok_vqa": 5, "textvqa": 10, "vizwiz": 5}
  for name, t in ec.tasks.items():
    assert t.shots == (0, 4, 32) and t.num_trials == 1
    assert t.train.startswith(str(world["data"] / name))
    if name in limits:
      assert t.max_new_tokens == limits[name]
  assert ec.tasks["ok_vqa"].answer_postprocess == "ok_vqa"
  assert ec.tasks["vqav2"].answer_postprocess == "vqa"
  # Every file of the released layouts is where the configs look (flickr30: not made here).
  for name in limits.keys() - {"flickr30"} | {"hateful_memes", "imagenet"}:
    train, test, _ = load_task_data(ec.tasks[name])
    assert train and test and all(os.path.exists(ex.image_path) for ex in train + test)


@pytest.mark.slow
def test_resume_trials_and_feature_cache(world, tmp_path):
  """A killed run continues where it stopped (a torn last line included) and gives the
  predictions of an uninterrupted one; trials are mean ± std of per-seed scores; the
  second run reads every image's cached latents from disk."""
  out = tmp_path / "out"
  args = ["--eval", _eval("coco", world), "--shots", "1", "--num_trials", "2", *_short("coco"),
          *GREEDY]
  full = _run(world, out, *args)
  run = full["results"]["coco"]["shots"]["1"]
  assert len(run["trials"]) == 2 and full["results"]["coco"]["seeds"] == [42, 43]
  assert run["score"] == pytest.approx(np.mean(run["trials"]))
  assert run["stddev"] == pytest.approx(np.std(run["trials"]))
  assert "±" in (out / "results.md").read_text()
  assert full["features"]["computed"] > 0
  first = json.loads((out / "predictions" / "coco_1shot_trial1.json").read_text())
  log_path = out / "predictions" / "coco_1shot_trial1.jsonl"
  lines = log_path.read_text().splitlines()
  assert len(lines) == 3  # header + 2 examples
  log_path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:15])  # killed mid-write
  again = _run(world, out, *args)
  resumed = again["results"]["coco"]["shots"]["1"]
  assert resumed["evaluated"] == 1 and resumed["trials"] == run["trials"]
  assert json.loads((out / "predictions" / "coco_1shot_trial1.json").read_text()) == first
  counts = again["features"]  # captioning reads the resampler's latents, not the features
  assert counts["computed"] == counts["latents_computed"] == 0 and counts["latents_loaded"] > 0
  # Other settings never continue these files.
  with pytest.raises(ValueError, match=r"coco_1shot\.jsonl holds predictions of another run "
                     r"\(differs in \['num_beams'\]\)"):
    _run(world, out, *args, "--config.eval.num_beams=2")
  # Features from the cache decode as the pixels do.
  pixels = _run(world, tmp_path / "pixels", *args, "--config.eval.feature_cache=off")
  assert pixels["results"]["coco"]["shots"]["1"]["trials"] == run["trials"]


@pytest.mark.slow
def test_classification_ensembling_and_hateful_memes(world, tmp_path):
  out = tmp_path / "out"
  report = _run(world, out, "--eval", _eval("imagenet", world), "--eval",
                _eval("hateful_memes", world), "--ensemble", "2",
                "--config.eval.tasks.imagenet.shots=(2,)",
                "--config.eval.tasks.hateful_memes.shots=(0,)", *GREEDY)
  imagenet = report["results"]["imagenet"]
  assert imagenet["metric"] == "top-1" and "2 shot orders" in imagenet["decoding"]
  assert sorted(imagenet["shots"]) == ["2"] and sorted(report["results"]["hateful_memes"]
                                                       ["shots"]) == ["0"]
  rows = json.loads((out / "predictions" / "imagenet_2shot.json").read_text())
  assert len(rows) == 3 and {r["label_name"] for r in rows} == {"tench", "goldfish",
                                                              "great white shark"}
  assert all(sorted(r["top5"]) == [0, 1, 2] and r["prediction"] in
             ("tench", "goldfish", "great white shark") for r in rows)
  hm = json.loads((out / "predictions" / "hateful_memes_0shot.json").read_text())
  assert len(hm) == 4 and all(len(r["scores"]) == 2 for r in hm)
  assert 0 <= report["results"]["hateful_memes"]["shots"]["0"]["score"] <= 100


@pytest.mark.slow
def test_mesh_gives_the_one_device_predictions(world, tmp_path):
  """8 fake CPU devices: params restored straight into tensor-parallel shardings, the
  queries split over 4 data-parallel shards; predictions equal one device's."""
  import jax
  if len(jax.devices()) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  args = ["--eval", _eval("vqav2", world), "--shots", "1", "--config.eval.batch_size=4",
          "--config.eval.decode_method=greedy", "--config.eval.prompt_buckets=(128,)",
          "--no_progress"]
  one = _run(world, tmp_path / "one", *args)
  sharded = _run(world, tmp_path / "mesh", *args, "--mesh.data=4", "--mesh.tensor=2")
  assert sharded["devices"] == 8
  a = json.loads((tmp_path / "one" / "predictions" / "vqav2_1shot.json").read_text())
  b = json.loads((tmp_path / "mesh" / "predictions" / "vqav2_1shot.json").read_text())
  assert [r["generated"] for r in a] == [r["generated"] for r in b]
  assert len(a) == 2
  # The sharded restore really lays the params out over the mesh.
  from flamingo_jax.runtime import sharding
  mesh_cfg = sharding.mesh_config({"data": 4, "tensor": 2})
  params = model_dir.load(world["model"], mesh=sharding.make_mesh(mesh_cfg),
                          mesh_cfg=mesh_cfg).params
  specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(params)}
  assert any("tensor" in s for s in specs)


@pytest.mark.slow
def test_user_errors_are_one_line(world, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cases = [
      (["--checkpoint", os.path.join(world["model"], "params"), "--eval", _eval("coco", world)],
       "is the params checkpoint; pass the model directory"),
      (["--checkpoint", world["model"], "--eval", f"{EVAL}/coco.py:{tmp_path}/nowhere"],
       "dataset_coco.json"),
      (["--checkpoint", world["model"]], "no benchmarks: pass one or more --eval"),
      (["--checkpoint", world["model"], "--eval", _eval("coco", world), "--eval",
        _eval("coco", world)], "eval task 'coco' of"),
  ]
  for args, message in cases:
    proc = subprocess.run([sys.executable, "-m", "flamingo_jax.evaluate", *args, "--out",
                           str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bad_configs(world):
  with pytest.raises(ValueError, match="eval.tasks.x.kind"):
    eval_config({"tasks": {"x": {"kind": "retrieval", "train": "a"}}})
  with pytest.raises(ValueError, match="unknown config key 'eval.batchsize'"):
    eval_config({"batchsize": 3})
  with pytest.raises(ValueError, match="no 'eval' section: pass one or more --eval"):
    from flamingo_jax.config import load_config
    eval_config(load_config(os.path.join(REPO, "configs", "tiny.py")))
  with pytest.raises(ValueError, match="answer_postprocess"):
    eval_config({"tasks": {"v": {"kind": "vqa", "format": "textvqa", "train": "a",
                                 "test": "b", "answer_postprocess": "lemmas"}}})
  with pytest.raises(ValueError, match="3 trials but only 2 trial seeds"):
    protocol(EvalConfig(), EvalTaskConfig(), num_trials=3, trial_seeds=(1, 2))
  # Paths resolve under data_root; absolute ones stay.
  t = validate_task(EvalTaskConfig(kind="vqa", format="textvqa", data_root="/d",
                                   train="a.json", test="/abs/b.json", image_root="imgs"), "t")
  assert (t.train, t.test, t.train_image_root) == ("/d/a.json", "/abs/b.json", "/d/imgs")


def test_demo_style_config_with_eval_section(world, tmp_path):
  """`--config FILE` with an eval section (the demo's way) composes with a model dir."""
  cfg = tmp_path / "eval_cfg.py"
  section = {"batch_size": 2, "decode_method": "greedy", "prompt_buckets": (128,),
             "tasks": {"caps": {"kind": "captioning", "data_root": str(world["data"] / "coco"),
                                "train": "dataset_coco.json", "train_splits": ("train",),
                                "image_root": ".", "max_new_tokens": 5}}}
  cfg.write_text("import ml_collections\n\n\ndef get_config():\n"
                 f"  return ml_collections.ConfigDict({{'eval': {section!r}}})\n")
  report = cli.main(["--config", str(cfg), "--checkpoint", world["model"], "--shots", "0",
                     "--out", str(tmp_path / "out"), "--no_progress"])
  assert report["tasks"] == ["caps"] and report["results"]["caps"]["num_examples"] == 2


def test_readers_textvqa_vizwiz(tmp_path):
  from flamingo_jax.evaluate import datasets
  make_textvqa(str(tmp_path / "t"))
  exs = datasets.read_textvqa(str(tmp_path / "t" / "TextVQA_0.5.1_val.json"), "imgs")
  assert [e.question_id for e in exs] == [30004, 30005]
  assert exs[0].image_path == os.path.join("imgs", f"{4:016x}.jpg")
  assert exs[0].answers == ("blue",) * 10
  make_vizwiz(str(tmp_path / "v"))
  exs = datasets.read_vizwiz(str(tmp_path / "v" / "Annotations" / "val.json"), "val")
  assert exs[1].question_id == "VizWiz_val_00000005.jpg" and exs[1].answer_type == "other"
  assert exs[1].answers == ("2",) * 10
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"image": "x.jpg"}]))
  with pytest.raises(ValueError, match="entry 0 is missing field 'question'"):
    datasets.read_vizwiz(str(bad))
  bad.write_text(json.dumps({"data": [{"question_id": 1, "question": "q"}]}))
  with pytest.raises(ValueError, match=r"data\[0\] is missing field 'image_id'"):
    datasets.read_textvqa(str(bad))
