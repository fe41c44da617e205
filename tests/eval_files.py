"""Evaluation files the tests share (not a test module): every benchmark's files in its
released layout (images, and real videos written with PyAV), and the tiny model directory
of conftest.py's `tiny_model_dir`."""
import json
import os

import numpy as np
from PIL import Image

from flamingo_jax import model_dir
from flamingo_jax.config import load_config
from flamingo_jax.data.train_tokenizer import train_tokenizer
from flamingo_jax.models.config import model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(REPO, "configs", "eval")
CAPTIONS = ["a red square on a blue field", "two green circles", "a small yellow triangle",
            "a big red circle", "three blue squares", "a green square and a red circle"]
QUESTIONS = [("what colour is the square", "red"), ("how many circles are there", "two"),
             ("what shape is yellow", "triangle"), ("is the circle big", "yes"),
             ("what colour are the squares", "blue"), ("how many shapes", "2")]
VIDEO_QA = [("what is the man doing", "cooking"), ("who is riding a bike", "woman"),
            ("what is the dog chasing", "ball"), ("how many cats are there", "two"),
            ("what colour is the car", "red"), ("what is the girl eating", "apple")]
VIDEO_CAPTIONS = ["a man is slicing a tomato", "a woman rides a bike down a hill",
                  "a dog runs after a ball", "two cats sleep on a sofa",
                  "a red car drives along a road", "a girl eats an apple in a park"]
# Frames: 4 new frames per second at 8 FPS for 2.5 s; frame k is a flat grey of 10 * k.
VIDEO_FPS, VIDEO_FRAMES = 8, 20


def _png(path, seed, size=(24, 40)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path, format="PNG")


def _json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


def make_coco(root):
  """dataset_coco.json (Karpathy) + train2014/ and val2014/ COCO-named images."""
  split = ["train", "restval", "train", "val", "test", "test"]
  images = []
  for i in range(6):
    folder = "val2014" if split[i] in ("val", "test", "restval") else "train2014"
    name = f"COCO_{folder}_{i + 1:012d}.jpg"
    _png(os.path.join(root, folder, name), i, (24 + 4 * i, 40))
    images.append({"filepath": folder, "filename": name, "cocoid": i + 1, "imgid": i,
                   "split": split[i], "sentids": [2 * i, 2 * i + 1],
                   "sentences": [{"raw": CAPTIONS[i], "tokens": CAPTIONS[i].split(),
                                  "imgid": i, "sentid": 2 * i},
                                 {"raw": CAPTIONS[(i + 1) % 6], "imgid": i,
                                  "tokens": CAPTIONS[(i + 1) % 6].split(),
                                  "sentid": 2 * i + 1}]})
  _json(os.path.join(root, "dataset_coco.json"), {"images": images, "dataset": "coco"})


def make_vqa(root, questions_name, annotations_name, subtypes=("train2014", "val2014")):
  """The VQAv2 (and OK-VQA) pair per split, COCO-named images under train2014/, val2014/."""
  for subtype, ids in zip(subtypes, (range(4), range(4, 6))):
    qs = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
          "data_subtype": subtype, "license": {},
          "questions": [{"question_id": 100 + i, "image_id": i + 1,
                         "question": QUESTIONS[i][0] + "?"} for i in ids]}
    anns = {"info": {}, "data_subtype": subtype, "annotations": [
        {"question_id": 100 + i, "image_id": i + 1, "question_type": "what",
         "answer_type": "other", "multiple_choice_answer": QUESTIONS[i][1],
         "answers": [{"answer": QUESTIONS[i][1], "answer_confidence": "yes",
                      "answer_id": j + 1} for j in range(10)]} for i in ids]}
    _json(os.path.join(root, questions_name.format(subtype)), qs)
    _json(os.path.join(root, annotations_name.format(subtype)), anns)
    for i in ids:
      _png(os.path.join(root, subtype, f"COCO_{subtype}_{i + 1:012d}.jpg"), i)


def make_textvqa(root):
  for split, ids in (("train", range(4)), ("val", range(4, 6))):
    _json(os.path.join(root, f"TextVQA_0.5.1_{split}.json"), {
        "dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [{"question": QUESTIONS[i][0], "image_id": f"{i:016x}",
                  "image_classes": ["Sign"], "flickr_original_url": "", "flickr_300k_url": "",
                  "image_width": 40, "image_height": 24, "answers": [QUESTIONS[i][1]] * 10,
                  "question_tokens": QUESTIONS[i][0].split(), "question_id": 30000 + i,
                  "set_name": split} for i in ids]})
    for i in ids:
      _png(os.path.join(root, "train_images", f"{i:016x}.jpg"), i)


def make_vizwiz(root):
  for split, ids in (("train", range(4)), ("val", range(4, 6))):
    entries = []
    for i in ids:
      name = f"VizWiz_{split}_{i:08d}.jpg"
      _png(os.path.join(root, split, name), i)
      entries.append({"image": name, "question": QUESTIONS[i][0], "answerable": 1,
                      "answer_type": "other",
                      "answers": [{"answer": QUESTIONS[i][1], "answer_confidence": "yes"}] * 10})
    _json(os.path.join(root, "Annotations", f"{split}.json"), entries)


def make_hateful_memes(root):
  for split, ids in (("train", range(4)), ("test_seen", range(4, 8))):
    with _open_new(os.path.join(root, f"{split}.jsonl")) as f:
      for i in ids:
        f.write(json.dumps({"id": 42950 + i, "img": f"img/{42950 + i}.png", "label": i % 2,
                            "text": CAPTIONS[i % 6]}) + "\n")
        _png(os.path.join(root, "img", f"{42950 + i}.png"), i)


def _open_new(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return open(path, "w")


def make_imagenet(root):
  wnids = ["n01440764", "n01443537", "n01484850"]
  for split, per in (("train", 2), ("val", 1)):
    for c, wnid in enumerate(wnids):
      for k in range(per):
        _png(os.path.join(root, split, wnid, f"ILSVRC2012_{split}_{c}{k}.JPEG"), 10 * c + k)
  with open(os.path.join(root, "classnames.txt"), "w") as f:
    f.write("tench\ngoldfish\ngreat white shark\n")


def export_tiny_model(root, captions, questions, seed):
  """configs/tiny.py with random weights and a BPE tokenizer trained on the prompts'
  words, exported as a model directory -> (directory, config)."""
  corpus = root / "corpus.txt"
  corpus.write_text("\n".join([f"Output: {c}" for c in captions] +
                              [f"Question: {q} Answer: {a}" for q, a in questions]) * 3)
  tok = train_tokenizer([str(corpus)], 96, str(root / "tokenizer"), model_type="bpe")
  tiny = load_config(os.path.join(REPO, "configs", "tiny.py"))
  tiny.model.image_token_id = tok.info.image_token_id
  tiny.model.eoc_token_id = tok.info.eoc_token_id
  config = model_config(tiny)
  directory = model_dir.export_model_dir(str(root / "model"), config,
                                         model_dir.init_params(config, seed=seed),
                                         str(root / "tokenizer" / "tokenizer.model"))
  return directory, config


def write_video(path, seed, codec, size=(24, 40), frames=VIDEO_FRAMES, fps=VIDEO_FPS):
  """A real video file: frame k is grey level 10 * k plus a seeded pattern in one corner."""
  import av  # PyAV: only the video builders need it
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


def make_msvd_qa(root):
  """{train,val,test}_qa.json, youtube_mapping.txt and YouTubeClips/<clip>.avi."""
  clips = [f"clip{i}_{5 * i}_{5 * i + 10}" for i in range(6)]
  with open(os.path.join(_mkdir(root), "youtube_mapping.txt"), "w") as f:
    f.write("".join(f"{c} vid{i + 1}\n" for i, c in enumerate(clips)))
  for split, ids in (("train", range(4)), ("val", range(4, 5)), ("test", range(4, 6))):
    _json(os.path.join(root, f"{split}_qa.json"),
          [{"answer": VIDEO_QA[i][1], "id": 100 + i, "question": VIDEO_QA[i][0] + "?",
            "video_id": i + 1} for i in ids])
  for i, c in enumerate(clips):
    write_video(os.path.join(root, "YouTubeClips", c + ".avi"), i, "mpeg4")


def make_msrvtt_qa(root):
  """{train,val,test}_qa.json; TrainValVideo/video<N>.mp4 and TestVideo/video<N>.mp4."""
  vids = [0, 1, 2, 3, 7010, 7011]
  for split, ids in (("train", range(4)), ("val", range(3, 4)), ("test", range(4, 6))):
    _json(os.path.join(root, f"{split}_qa.json"),
          [{"answer": VIDEO_QA[i][1], "category_id": i % 3, "id": 10 * i,
            "question": VIDEO_QA[i][0], "video_id": vids[i]} for i in ids])
  for i, v in enumerate(vids):
    folder = "TestVideo" if v >= 7010 else "TrainValVideo"
    write_video(os.path.join(root, folder, f"video{v}.mp4"), 10 + i, "h264")


def make_vatex(root):
  """vatex_{training,validation}_v1.0.json and videos/<videoID>.mp4 (one as frames)."""
  ids = [f"Yt{i:09d}_{10 * i:06d}_{10 * i + 10:06d}" for i in range(6)]
  for split, idx in (("training", range(4)), ("validation", range(4, 6))):
    _json(os.path.join(root, f"vatex_{split}_v1.0.json"),
          [{"videoID": ids[i], "enCap": [VIDEO_CAPTIONS[i], VIDEO_CAPTIONS[(i + 1) % 6]],
            "chCap": ["一个人"] * 2} for i in idx])
  for i, v in enumerate(ids):
    if i == 5:  # a folder of extracted frames stands for the video
      write_frames(os.path.join(root, "videos", v), 20 + i)
    else:
      write_video(os.path.join(root, "videos", v + ".mp4"), 20 + i, "h264")


def _mkdir(path):
  os.makedirs(path, exist_ok=True)
  return path
