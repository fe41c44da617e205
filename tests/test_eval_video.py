"""Video benchmarks as users run them: configs/eval/{msvd_qa,msrvtt_qa,vatex}.py on small
files laid out exactly like the released datasets (real .avi / .mp4 written with PyAV, a
folder of extracted frames), clips [T, H, W, 3] through the model's video path."""
import json
import os

import av
import numpy as np
import pytest
from PIL import Image

from flamingo_jax.errors import run_cli
from flamingo_jax.evaluate import datasets, runner, video
from test_evaluate_cli import export_tiny_model  # configs/tiny.py: resampler max_frames 4

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(REPO, "configs", "eval")
QA = [("what is the man doing", "cooking"), ("who is riding a bike", "woman"),
      ("what is the dog chasing", "ball"), ("how many cats are there", "two"),
      ("what colour is the car", "red"), ("what is the girl eating", "apple")]
CAPTIONS = ["a man is slicing a tomato", "a woman rides a bike down a hill",
            "a dog runs after a ball", "two cats sleep on a sofa",
            "a red car drives along a road", "a girl eats an apple in a park"]
# Frames: 4 new frames per second at 8 FPS for 2.5 s; frame k is a flat grey of 10 * k.
VIDEO_FPS, VIDEO_FRAMES = 8, 20
CLIP = ["--config.eval.tasks.{}.num_frames=6", "--config.eval.tasks.{}.fps=2"]
GREEDY = ["--config.eval.decode_method=greedy", "--config.eval.batch_size=2",
          "--config.eval.prompt_buckets=(128,)", "--no_progress"]


def write_video(path, seed, codec, size=(24, 40), frames=VIDEO_FRAMES, fps=VIDEO_FPS):
  """A real video file: frame k is grey level 10 * k plus a seeded pattern in one corner."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  corner = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    for k in range(frames):
      img = np.full(size + (3,), 10 * k, np.uint8)
      img[:8, :8] = corner
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_frames(folder, seed, size=(24, 40), frames=VIDEO_FRAMES):
  """The same clip as extracted frames (one JPEG per frame, at VIDEO_FPS)."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  corner = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  for k in range(frames):
    img = np.full(size + (3,), 10 * k, np.uint8)
    img[:8, :8] = corner
    Image.fromarray(img).save(os.path.join(folder, f"{k + 1:05d}.jpg"), quality=95)


def _json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


def make_msvd_qa(root):
  """{train,val,test}_qa.json, youtube_mapping.txt and YouTubeClips/<clip>.avi."""
  clips = [f"clip{i}_{5 * i}_{5 * i + 10}" for i in range(6)]
  with open(os.path.join(_mkdir(root), "youtube_mapping.txt"), "w") as f:
    f.write("".join(f"{c} vid{i + 1}\n" for i, c in enumerate(clips)))
  for split, ids in (("train", range(4)), ("val", range(4, 5)), ("test", range(4, 6))):
    _json(os.path.join(root, f"{split}_qa.json"),
          [{"answer": QA[i][1], "id": 100 + i, "question": QA[i][0] + "?",
            "video_id": i + 1} for i in ids])
  for i, c in enumerate(clips):
    write_video(os.path.join(root, "YouTubeClips", c + ".avi"), i, "mpeg4")


def make_msrvtt_qa(root):
  """{train,val,test}_qa.json; TrainValVideo/video<N>.mp4 and TestVideo/video<N>.mp4."""
  vids = [0, 1, 2, 3, 7010, 7011]
  for split, ids in (("train", range(4)), ("val", range(3, 4)), ("test", range(4, 6))):
    _json(os.path.join(root, f"{split}_qa.json"),
          [{"answer": QA[i][1], "category_id": i % 3, "id": 10 * i, "question": QA[i][0],
            "video_id": vids[i]} for i in ids])
  for i, v in enumerate(vids):
    folder = "TestVideo" if v >= 7010 else "TrainValVideo"
    write_video(os.path.join(root, folder, f"video{v}.mp4"), 10 + i, "h264")


def make_vatex(root):
  """vatex_{training,validation}_v1.0.json and videos/<videoID>.mp4 (one as frames)."""
  ids = [f"Yt{i:09d}_{10 * i:06d}_{10 * i + 10:06d}" for i in range(6)]
  for split, idx in (("training", range(4)), ("validation", range(4, 6))):
    _json(os.path.join(root, f"vatex_{split}_v1.0.json"),
          [{"videoID": ids[i], "enCap": [CAPTIONS[i], CAPTIONS[(i + 1) % 6]],
            "chCap": ["一个人"] * 2} for i in idx])
  for i, v in enumerate(ids):
    if i == 5:  # a folder of extracted frames stands for the video
      write_frames(os.path.join(root, "videos", v), 20 + i)
    else:
      write_video(os.path.join(root, "videos", v + ".mp4"), 20 + i, "h264")


def _mkdir(path):
  os.makedirs(path, exist_ok=True)
  return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The three video benchmarks in their released layouts, and an exported tiny model."""
  root = tmp_path_factory.mktemp("video_eval")
  data = root / "data"
  make_msvd_qa(str(data / "msvd_qa"))
  make_msrvtt_qa(str(data / "msrvtt_qa"))
  make_vatex(str(data / "vatex"))
  directory, config = export_tiny_model(root, CAPTIONS, QA, seed=3)
  return dict(root=root, data=data, model=directory, config=config)


def _eval(name, world):
  return f"{EVAL}/{name}.py:{world['data'] / name}"


def _clip(*tasks):
  return [a.format(t) for t in tasks for a in CLIP]


def _run(world, out, *args):
  return runner.main(["--checkpoint", world["model"], "--out", str(out), *args])


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
  clip = video.load_clip(str(tmp_path / "a.mp4"), 32, 4, 1.0, 0.0, runner.IMAGENET_MEAN,
                         runner.IMAGENET_STD)
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
      CAPTIONS[4], CAPTIONS[5])
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
  cfg, order = runner.compose({}, eval_files=[_eval(n, world) for n in (
      "msvd_qa", "msrvtt_qa", "vatex")])
  ec = runner.eval_config(cfg)
  assert order == ["msvd_qa", "msrvtt_qa", "vatex"]
  assert (ec.decode_method, ec.num_beams) == ("beam", 3)
  for name, t in ec.tasks.items():
    assert (t.num_frames, t.fps, t.shots, t.num_trials) == (30, 3.0, (0, 4, 32), 1)
    assert t.max_new_tokens == (20 if name == "vatex" else 5)
    assert t.kind == ("captioning" if name == "vatex" else "video_qa")
    train, test, _ = runner.load_task_data(t)
    assert len(train) == 4 and len(test) == 2
    assert all(os.path.exists(ex.image_path) for ex in train + test)
  with pytest.raises(ValueError, match="'eval.tasks.v.num_frames' must be >= 1"):
    runner.eval_config({"tasks": {"v": {"kind": "captioning", "format": "vatex",
                                        "train": "a", "test": "b"}}})
  with pytest.raises(ValueError, match="'eval.tasks.c.num_frames' is for the video formats"):
    runner.eval_config({"tasks": {"c": {"kind": "captioning", "train": "a", "num_frames": 8}}})
  with pytest.raises(ValueError, match="'eval.tasks.m.video_mapping' is empty"):
    runner.eval_config({"tasks": {"m": {"kind": "video_qa", "format": "msvd_qa", "train": "a",
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
  assert vatex[1]["references"] == [CAPTIONS[5], CAPTIONS[0]]
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
  status = run_cli(runner.main, ["--checkpoint", world["model"], "--eval",
                                 f"{EVAL}/msrvtt_qa.py:{root}", "--shots", "0",
                                 *_clip("msrvtt_qa"), *GREEDY, "--out", str(tmp_path / "out")])
  assert status == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("error: video ") and "video7011.mp4" in last, last
  assert "cannot decode video" in last
