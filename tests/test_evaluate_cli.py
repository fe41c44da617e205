"""End to end: tiny benchmark files + an orbax checkpoint -> the CLI -> results JSON and table."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.evaluate import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red square on a blue field", "two green circles", "a small yellow triangle",
            "a big red circle", "three blue squares", "a green square and a red circle"]
QUESTIONS = [("what colour is the square", "red"), ("how many circles are there", "two"),
             ("what shape is yellow", "triangle"), ("is the circle big", "yes"),
             ("what colour are the squares", "blue"), ("how many shapes", "2")]

CONFIG = '''
import importlib.util
spec = importlib.util.spec_from_file_location("tiny", {tiny!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)


def get_config():
  config = tiny.get_config()
  config.model.image_token_id = {image_id}
  config.model.eoc_token_id = {eoc_id}
  config.eval = {eval!r}
  return config
'''


def _write_png(path, seed, size):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """Fake COCO (Karpathy) and VQAv2 files, PNGs, a tokenizer, a config and a checkpoint."""
  from flamingo_jax.training.checkpoint import save_params
  from flamingo_jax.data.train_tokenizer import train_tokenizer
  root = tmp_path_factory.mktemp("bench")
  os.makedirs(root / "images")
  for i in range(6):  # non-square images: aspect-preserving resize with mean padding
    _write_png(root / "images" / f"img_{i}.png", i, (24 + 4 * i, 40))
  split = ["train"] * 4 + ["test"] * 2
  karpathy = {"images": [
      {"filename": f"img_{i}.png", "imgid": i, "split": split[i],
       "sentences": [{"raw": CAPTIONS[i]}, {"raw": CAPTIONS[(i + 1) % 6]}]} for i in range(6)]}
  (root / "karpathy.json").write_text(json.dumps(karpathy))
  for name, ids in (("train", range(4)), ("test", range(4, 6))):
    qs = {"questions": [{"question_id": 100 + i, "image_id": i, "question": QUESTIONS[i][0]}
                        for i in ids]}
    anns = {"annotations": [{"question_id": 100 + i, "image_id": i, "answer_type": "other",
                             "answers": [{"answer": QUESTIONS[i][1]}] * 10} for i in ids]}
    (root / f"{name}_questions.json").write_text(json.dumps(qs))
    (root / f"{name}_annotations.json").write_text(json.dumps(anns))
  corpus = root / "corpus.txt"
  corpus.write_text("\n".join([f"Output: {c}" for c in CAPTIONS] +
                              [f"Question: {q} Answer: {a}" for q, a in QUESTIONS]) * 3)
  tok = train_tokenizer([str(corpus)], 96, str(root / "tokenizer"), model_type="bpe")
  images = str(root / "images")
  eval_section = {
      "tokenizer": str(root / "tokenizer" / "tokenizer.model"),
      "batch_size": 2, "prompt_buckets": (64, 128),
      "tasks": {
          "coco": {"kind": "captioning", "train": str(root / "karpathy.json"),
                   "train_splits": ("train",), "image_root": images, "max_new_tokens": 5},
          "vqav2": {"kind": "vqa", "train": str(root / "train_questions.json"),
                    "train_annotations": str(root / "train_annotations.json"),
                    "test": str(root / "test_questions.json"),
                    "test_annotations": str(root / "test_annotations.json"),
                    "image_root": images, "image_naming": "img_{image_id}.png",
                    "max_new_tokens": 5},
      }}
  config_path = root / "eval_config.py"
  config_path.write_text(CONFIG.format(tiny=os.path.join(REPO, "configs", "tiny.py"),
                                       image_id=tok.info.image_token_id,
                                       eoc_id=tok.info.eoc_token_id, eval=eval_section))
  from flamingo_jax.config import model_config
  from flamingo_jax.config import load_config
  config = model_config(load_config(str(config_path)))
  save_params(str(root / "ckpt"), runner.init_params(config, seed=1))
  return dict(root=root, config=str(config_path), ckpt=str(root / "ckpt"), tok=tok)


def _check_outputs(out, tasks, shots):
  report = json.loads((out / "results.json").read_text())
  assert report["tasks"] == tasks and report["shots"] == shots
  for task in tasks:
    entry = report["results"][task]
    assert entry["metric"] == {"coco": "CIDEr", "vqav2": "VQA acc."}[task]
    assert sorted(entry["shots"]) == sorted(str(s) for s in shots)
    for run in entry["shots"].values():
      assert np.isfinite(run["score"]) and run["examples_per_s"] > 0
    for s in shots:
      assert (out / "predictions" / f"{task}_{s}shot.json").exists()
  table = (out / "results.md").read_text()
  assert "| task | metric | " + " | ".join(f"{s}-shot" for s in shots) + " |" in table
  for task in tasks:
    assert f"| {task} |" in table
  return report


def test_cli_function_call(bench, tmp_path):
  out = tmp_path / "out"
  report = runner.main(["--config", bench["config"], "--checkpoint", bench["ckpt"],
                        "--tasks", "coco,vqav2", "--shots", "0,2", "--num_samples", "2",
                        "--out", str(out), "--no_progress"])
  _check_outputs(out, ["coco", "vqav2"], [0, 2])
  assert report["checkpoint"] == bench["ckpt"] and not report["random_init"]
  preds = json.loads((out / "predictions" / "coco_2shot.json").read_text())
  assert len(preds) == 2 and all(len(p["shots"]) == 2 for p in preds)
  assert all(s < 4 for p in preds for s in p["shots"])  # demonstrations from the train split
  # RICES picks demonstrations by pooled vision features, most similar last.
  rices_out = tmp_path / "rices"
  runner.main(["--config", bench["config"], "--checkpoint", bench["ckpt"], "--tasks", "coco",
               "--shots", "2", "--rices", "--out", str(rices_out), "--no_progress"])
  report = _check_outputs(rices_out, ["coco"], [2])
  assert report["rices"]


@pytest.mark.slow
def test_cli_subprocess(bench, tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "flamingo_jax.evaluate", "--config", bench["config"],
       "--random_init", "--tasks", "vqav2", "--shots", "0", "--num_samples", "1",
       "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| vqav2 | VQA acc. |" in proc.stdout
  assert "examples_per_s" in proc.stderr  # the tqdm progress bar
  _check_outputs(out, ["vqav2"], [0])


def test_bad_configs(bench):
  with pytest.raises(ValueError, match="eval.tasks.x.kind"):
    runner.eval_config({"tasks": {"x": {"kind": "captions", "train": "a"}}})
  with pytest.raises(ValueError, match="eval.tasks.v.test_annotations"):
    runner.eval_config({"tasks": {"v": {"kind": "vqa", "train": "q", "train_annotations": "a",
                                        "test": "q"}}})
  with pytest.raises(ValueError, match="unknown config key 'eval.batchsize'"):
    runner.eval_config({"batchsize": 3})
  with pytest.raises(ValueError, match="no 'eval' section"):
    from flamingo_jax.config import load_config
    runner.eval_config(load_config(os.path.join(REPO, "configs", "tiny.py")))
  with pytest.raises(ValueError, match="unknown eval task"):
    runner.main(["--config", bench["config"], "--random_init", "--tasks", "flickr",
                 "--out", "/tmp/unused"])


def test_encode_prompt_and_image(bench):
  tok = bench["tok"]
  ids = runner.encode_prompt("Output: two<EOC><image>Output:", tok)
  info = tok.info
  assert ids[0] == info.bos_id and info.eoc_token_id in ids
  assert ids.index(info.image_token_id) == ids.index(info.eoc_token_id) + 1
  img = runner.load_image(str(bench["root"] / "images" / "img_0.png"), 32)
  assert img.shape == (1, 32, 32, 3)
  # 24x40 -> 19x32 content: the padding rows are the mean, so exactly 0 once normalised.
  assert np.abs(img[0, 0]).max() == 0 and np.abs(img[0, 16]).max() > 0


@pytest.mark.slow
def test_synthetic_heldout_split(tmp_path):
  """The embedded shapes dataset's held-out (val) split: captions, VQA and classification."""
  synthetic = pytest.importorskip("flamingo_jax.data.synthetic")
  from flamingo_jax.training.checkpoint import save_params
  from flamingo_jax.config import model_config
  from flamingo_jax.config import load_config
  data = tmp_path / "shapes"
  manifest = synthetic.write_synthetic(
      str(data), image_size=32, arrayrecord=False,
      sizes=synthetic.Sizes(pairs=(16, 16), documents=(1, 1), videos=(1, 1), video_frames=2,
                            corpus_lines=200, vocab_size=200))
  info = manifest["tokenizer"]
  images = str(data / "images")
  eval_section = {
      "tokenizer": str(data / "tokenizer" / "tokenizer.model"), "batch_size": 2,
      "prompt_buckets": (64, 128), "decode_method": "greedy",
      "tasks": {
          "coco": {"kind": "captioning", "train": str(data / "captions" / "dataset_shapes.json"),
                   "train_splits": ("train",), "test_splits": ("val",), "image_root": images,
                   "max_new_tokens": 5},
          "vqav2": {"kind": "vqa", "train": str(data / "vqa" / "train_questions.json"),
                    "train_annotations": str(data / "vqa" / "train_annotations.json"),
                    "test": str(data / "vqa" / "val_questions.json"),
                    "test_annotations": str(data / "vqa" / "val_annotations.json"),
                    "image_root": images, "image_naming": "{data_subtype}/{image_id}.png",
                    "max_new_tokens": 5},
          "shapes": {"kind": "classification", "format": "list",
                     "train": str(data / "classification" / "train.json"),
                     "test": str(data / "classification" / "val.json"),
                     "class_names": str(data / "classification" / "classes.json"),
                     "image_root": images},
      }}
  config_path = tmp_path / "shapes_config.py"
  config_path.write_text(CONFIG.format(tiny=os.path.join(REPO, "configs", "tiny.py"),
                                       image_id=info["image_token_id"],
                                       eoc_id=info["eoc_token_id"], eval=eval_section))
  config = model_config(load_config(str(config_path)))
  save_params(str(tmp_path / "ckpt"), runner.init_params(config, seed=2))
  out = tmp_path / "out"
  report = runner.main(["--config", str(config_path), "--checkpoint", str(tmp_path / "ckpt"),
                        "--tasks", "coco,vqav2,shapes", "--shots", "2", "--num_samples",
                        "3", "--out", str(out), "--no_progress"])
  shapes_run = report["results"]["shapes"]
  assert shapes_run["metric"] == "top-1"
  assert all(0 <= r["score"] <= 100 for r in shapes_run["shots"].values())
  table = (out / "results.md").read_text()
  assert "| shapes | top-1 |" in table and "| coco | CIDEr |" in table
