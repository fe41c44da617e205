"""Video benchmarks as users run them: configs/eval/{msvd_qa,msrvtt_qa,vatex}.py on small
files laid out exactly like the released datasets (real .avi / .mp4 written with PyAV, a
folder of extracted frames), clips [T, H, W, 3] through the model's video path."""
import json
import os

import numpy as np
import pytest

from flamingo_jax.errors import run_cli
from flamingo_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from flamingo_jax.evaluate import cli, datasets, video
from flamingo_jax.evaluate.config import compose, eval_config
from flamingo_jax.evaluate.inputs import load_task_data
from eval_files import (VIDEO_CAPTIONS, VIDEO_FPS, VIDEO_FRAMES, VIDEO_QA, export_tiny_model,
                        make_msrvtt_qa, make_msvd_qa, make_vatex, write_frames, write_video)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(REPO, "configs", "eval")
CLIP = ["--config.eval.tasks.{}.num_frames=6", "--config.eval.tasks.{}.fps=2"]
GREEDY = ["--config.eval.decode_method=greedy", "--config.eval.batch_size=2",
          "--config.eval.prompt_buckets=(128,)", "--no_progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The three video benchmarks in their released layouts, and an exported tiny model."""
  root = tmp_path_factory.mktemp("video_eval")
  data = root / "data"
  make_msvd_qa(str(data / "msvd_qa"))
  make_msrvtt_qa(str(data / "msrvtt_qa"))
  make_vatex(str(data / "vatex"))
  directory, config = export_tiny_model(root, VIDEO_CAPTIONS, VIDEO_QA, seed=3)
  return dict(root=root, data=data, model=directory, config=config)


def _eval(name, world):
  return f"{EVAL}/{name}.py:{world['data'] / name}"


def _clip(*tasks):
  return [a.format(t) for t in tasks for a in CLIP]


def _run(world, out, *args):
  return cli.main(["--checkpoint", world["model"], "--out", str(out), *args])


def test_clips_are_sampled_at_fps_from_files_and_frame_folders(tmp_path):
  """Frame k of the clip is the one on screen at k / fps (the grey level says which);
  past the end the last frame repeats; a frame folder gives the file's frames."""
  for name, codec in (("a.mp4", "h264"), ("a.avi", "mpeg4")):
    write_video(str(tmp_path / name), 0, codec)
    frames = video.read_frames(str(tmp_path / name), num_frames=7, fps=3.0)
    assert len(frames) == 7 and frames[0].shape == (24, 40, 3)
    # times 0, 1/3, ..., 2 s at 8 FPS -> source frames floor(8 k / 3); the video has 20
    want = [min(int(np.floor(8 * k / 3 + 1e-6)), VIDEO_FRAMES - 1) for k in range(7)]
    got = [int(round(float(f[8:, 8:].mean()) / 10)) for f in frames]
    assert got == want, (name, got, want)
  write_frames(str(tmp_path / "frames"), 0)
  folder = video.read_frames(str(tmp_path / "frames"), 7, 3.0, frames_fps=VIDEO_FPS)
  assert [int(round(float(f[8:, 8:].mean()) / 10)) for f in folder] == want
  clip = video.load_clip(str(tmp_path / "a.mp4"), 32, 4, 1.0, 0.0, IMAGENET_MEAN,
                         IMAGENET_STD)
  assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.float32
  assert not np.allclose(clip[0], clip[1])  # the frames really differ along T
  (tmp_path / "bad.mp4").write_bytes(b"\x00\x01 not a video")
  with pytest.raises(ValueError, match=r"video '.*bad\.mp4': cannot decode video"):
    video.read_frames(str(tmp_path / "bad.mp4"), 4, 1.0)
  with pytest.raises(ValueError, match=r"cannot read video '.*missing\.mp4'"):
    video.read_frames(str(tmp_path / "missing.mp4"), 4, 1.0)


def test_readers_in_the_released_layouts(tmp_path):
  make_msvd_qa(str(tmp_path / "msvd"))
  exs = datasets.read_msvd_qa(str(tmp_path / "msvd" / "test_qa.json"),
                              str(tmp_path / "msvd" / "youtube_mapping.txt"), "clips")
  assert [(e.question_id, e.image_id, e.answers) for e in exs] == [
      (104, 5, ("red",)), (105, 6, ("apple",))]
  assert exs[0].image_path == os.path.join("clips", "clip4_20_30.avi")
  make_msrvtt_qa(str(tmp_path / "msrvtt"))
  exs = datasets.read_msrvtt_qa(str(tmp_path / "msrvtt" / "test_qa.json"), "TestVideo")
  assert [e.image_path for e in exs] == [os.path.join("TestVideo", f"video{v}.mp4")
                                         for v in (7010, 7011)]
  make_vatex(str(tmp_path / "vatex"))
  root = str(tmp_path / "vatex" / "videos")
  exs = datasets.read_vatex(str(tmp_path / "vatex" / "vatex_validation_v1.0.json"), root)
  assert exs[0].image_path.endswith("_000040_000050.mp4") and exs[0].captions == (
      VIDEO_CAPTIONS[4], VIDEO_CAPTIONS[5])
  assert os.path.isdir(exs[1].image_path)  # only extracted frames exist for it
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"id": 1, "question": "q", "video_id": 3}]))
  with pytest.raises(ValueError, match="entry 0 is missing field 'answer'"):
    datasets.read_msrvtt_qa(str(bad))
  with pytest.raises(ValueError, match=r"video_id 9 has no line '... vid9'"):
    bad.write_text(json.dumps([{"id": 1, "question": "q", "answer": "a", "video_id": 9}]))
    datasets.read_msvd_qa(str(bad), str(tmp_path / "msvd" / "youtube_mapping.txt"))
  bad.write_text(json.dumps([{"videoID": "x", "enCap": []}]))
  with pytest.raises(ValueError, match="'enCap' should be a non-empty list"):
    datasets.read_vatex(str(bad))


def test_video_configs_follow_the_protocol(world):
  """The paper's inference clips (30 frames at 3 FPS), shots, beam 3, token limits;
  every file of the released layouts is where the configs look."""
  cfg, order = compose(eval_files=[_eval(n, world) for n in ("msvd_qa", "msrvtt_qa",
                                                             "vatex")])
  ec = eval_config(cfg)
  assert order == ["msvd_qa", "msrvtt_qa", "vatex"]
  assert (ec.decode_method, ec.num_beams) == ("beam", 3)
  for name, t in ec.tasks.items():
    assert (t.num_frames, t.fps, t.shots, t.num_trials) == (30, 3.0, (0, 4, 32), 1)
    assert t.max_new_tokens == (20 if name == "vatex" else 5)
    assert t.kind == ("captioning" if name == "vatex" else "video_qa")
    train, test, _ = load_task_data(t)
    assert len(train) == 4 and len(test) == 2
    assert all(os.path.exists(ex.image_path) for ex in train + test)
  with pytest.raises(ValueError, match="'eval.tasks.v.num_frames' must be >= 1"):
    eval_config({"tasks": {"v": {"kind": "captioning", "format": "vatex",
                                 "train": "a", "test": "b"}}})
  with pytest.raises(ValueError, match="'eval.tasks.c.num_frames' is for the video formats"):
    eval_config({"tasks": {"c": {"kind": "captioning", "train": "a", "num_frames": 8}}})
  with pytest.raises(ValueError, match="'eval.tasks.m.video_mapping' is empty"):
    eval_config({"tasks": {"m": {"kind": "video_qa", "format": "msvd_qa", "train": "a",
                                 "test": "b", "num_frames": 8, "fps": 1.0}}})


@pytest.mark.slow
def test_video_benchmarks_end_to_end(world, tmp_path):
  """The three video configs in one command: clips of 6 frames (more than the tiny
  model's 4 temporal embeddings, so they are interpolated) at 2 FPS, their features
  cached per clip [T, S, C]; predictions carry the references; decoding from the cached
  features gives the predictions of decoding from the pixels."""
  out = tmp_path / "out"
  names = ["msvd_qa", "msrvtt_qa", "vatex"]
  args = [a for n in names for a in ("--eval", _eval(n, world))] + [
      "--shots", "1", "--config.eval.tasks.vatex.max_new_tokens=5", *_clip(*names), *GREEDY]
  report = _run(world, out, *args)
  assert report["tasks"] == names
  for name in names:
    entry = report["results"][name]
    assert entry["metric"] == ("CIDEr" if name == "vatex" else "top-1")
    assert entry["num_examples"] == 2
    assert 0 <= entry["shots"]["1"]["score"] <= (1000 if name == "vatex" else 100)
    rows = json.loads((out / "predictions" / f"{name}_1shot.json").read_text())
    assert len(rows) == 2 and all(isinstance(r["prediction"], str) for r in rows)
    assert all(r["shots"][0] in range(4) for r in rows)
  msvd = json.loads((out / "predictions" / "msvd_qa_1shot.json").read_text())
  assert [(r["id"], r["answers"]) for r in msvd] == [(104, ["red"]), (105, ["apple"])]
  vatex = json.loads((out / "predictions" / "vatex_1shot.json").read_text())
  assert vatex[1]["references"] == [VIDEO_CAPTIONS[5], VIDEO_CAPTIONS[0]]
  assert "| msvd_qa | top-1 |" in (out / "results.md").read_text()
  # One cached feature file per clip of each benchmark used, each [T = 6, S, C].
  clips = 0
  for n in names:  # the queries' clips and their demonstrations' (other videos)
    rows = json.loads((out / "predictions" / f"{n}_1shot.json").read_text())
    clips += len(rows) + len({s for r in rows for s in r["shots"]})
  files = sorted((out / "features").glob("*.npy"))
  assert report["features"]["computed"] == len(files) == clips
  shapes = {np.load(f).shape for f in files}
  grid = (world["config"].vision.image_size // 8) ** 2
  assert shapes == {(6, grid, world["config"].vision_feature_dim)}
  pixels = _run(world, tmp_path / "pixels", *args, "--config.eval.feature_cache=off")
  for name in names:
    assert pixels["results"][name]["shots"]["1"]["trials"] == \
        report["results"][name]["shots"]["1"]["trials"]
    a = json.loads((out / "predictions" / f"{name}_1shot.json").read_text())
    b = json.loads((tmp_path / "pixels" / "predictions" / f"{name}_1shot.json").read_text())
    assert [r["generated"] for r in a] == [r["generated"] for r in b]


def test_unreadable_video_is_one_error_line(world, tmp_path, capsys):
  """A corrupt clip stops the run with `error: video '<file>': ...`, exit 2."""
  root = tmp_path / "msrvtt_qa"
  make_msrvtt_qa(str(root))
  (root / "TestVideo" / "video7011.mp4").write_bytes(b"truncated download")
  status = run_cli(cli.main, ["--checkpoint", world["model"], "--eval",
                              f"{EVAL}/msrvtt_qa.py:{root}", "--shots", "0",
                              *_clip("msrvtt_qa"), *GREEDY, "--out", str(tmp_path / "out")])
  assert status == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("error: video ") and "video7011.mp4" in last, last
  assert "cannot decode video" in last
