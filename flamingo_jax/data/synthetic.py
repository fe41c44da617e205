"""The embedded demo dataset: the shapes world (shapes.py) in the real formats.

  python -m flamingo_jax.data.synthetic --out DIR [--seed 0] [--image_size 64]

Writes, deterministically from the seed, train and val splits of:
  pairs/        img2dataset tars: KEY.jpg, KEY.txt (caption), KEY.json
  vqa/          the same kind of tars with "Question: q Answer: a" texts
  interleaved/  OBELICS-layout documents (stories, captioned galleries, quizzes,
                and made-up names for shapes: shapes.document), images as
                members of the shard
  video/        frame lists KEY.0000.jpg... recorded at 2 FPS, KEY.json
  arrayrecord/KIND/SPLIT-*.array_record   the same data, converted
  for evaluation, in the layouts flamingo_jax.evaluate reads (images root:
  DIR/images, image ids unique across splits):
    images/SPLIT/ID.png
    captions/dataset_shapes.json     Karpathy split file (read_karpathy_captions)
    vqa/SPLIT_questions.json + SPLIT_annotations.json   VQAv2 pair (read_vqa,
                                     image_naming="{data_subtype}/{image_id}.png")
    classification/SPLIT.json + classes.json   (read_classification_list)
  corpus.txt    text of the train split, for pretraining the tiny LM
  tokenizer/    a sentencepiece model trained on corpus.txt
  manifest.json what was written, and data configs that read it
The default size writes in a few seconds.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from flamingo_jax.data import shapes
from flamingo_jax.data.convert import convert
from flamingo_jax.errors import ArgumentParser, run_cli

SPLITS = ("train", "val")
SOURCE_FPS = 2.0
# Pictures per document at most: a gallery of 8 captioned pictures is an 8-shot prompt.
DOCUMENT_IMAGES = 8


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Examples per split (train, val)."""
  pairs: tuple[int, int] = (2000, 200)
  documents: tuple[int, int] = (1600, 100)
  videos: tuple[int, int] = (300, 50)
  video_frames: int = 16  # recorded at SOURCE_FPS: 8 s, 8 frames at 1 FPS
  corpus_lines: int = 20_000
  vocab_size: int = 512  # an upper bound: the shapes world has fewer pieces
  samples_per_shard: int = 1000


def _encode(img: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buf.getvalue()


def _tar_header(name: str, size: int) -> bytes:
  """A ustar header with fixed mode, owner and mtime (so archives are reproducible);
  tarfile writes the same bytes, 10x slower."""
  raw = name.encode("utf-8")
  if len(raw) > 100:
    raise ValueError(f"member name longer than 100 bytes: {name!r}")
  h = bytearray(512)
  h[0:len(raw)] = raw
  h[100:108] = b"0000644\0"
  h[108:116] = b"0000000\0"
  h[116:124] = b"0000000\0"
  h[124:136] = b"%011o\0" % size
  h[136:148] = b"00000000000\0"
  h[156:157] = b"0"
  h[257:265] = b"ustar\x0000"
  h[148:156] = b" " * 8
  h[148:156] = b"%06o\0 " % sum(h)
  return bytes(h)


class _TarWriter:
  """Deterministic WebDataset shards, rotated every n samples."""

  def __init__(self, out_dir: str, split: str, per_shard: int):
    self.out_dir, self.split, self.per_shard = out_dir, split, per_shard
    self.paths: list[str] = []
    self._f, self._n = None, 0
    os.makedirs(out_dir, exist_ok=True)

  def add(self, members: Iterable[tuple[str, bytes]]) -> None:
    if self._f is None or self._n == self.per_shard:
      self.close()
      self.paths.append(os.path.join(self.out_dir, f"{self.split}-{len(self.paths):05d}.tar"))
      self._f, self._n = open(self.paths[-1], "wb"), 0
    for name, data in members:
      self._f.write(_tar_header(name, len(data)))
      self._f.write(data)
      self._f.write(bytes(-len(data) % 512))
    self._n += 1

  def close(self) -> None:
    if self._f is not None:
      self._f.write(bytes(1024))  # end-of-archive marker
      self._f.close()
      self._f = None


STREAMS = ("pairs", "documents", "videos", "corpus")


def _write_json(path: str, obj, indent=None) -> None:
  with open(path, "w") as f:
    f.write(json.dumps(obj, indent=indent))  # dumps: the C encoder, unlike dump


def _rng(seed: int, stream: str, split: str) -> np.random.Generator:
  """An independent generator per (seed, kind of data, split)."""
  return np.random.default_rng([seed, STREAMS.index(stream), SPLITS.index(split)])


def image_id(split: str, i: int) -> int:
  """Image ids unique across splits (the evaluation readers require it)."""
  return SPLITS.index(split) * 1_000_000 + i


def _write_pairs(out: str, split: str, n: int, size: int, seed: int, per_shard: int,
                 corpus: list[str], karpathy: list[dict]) -> dict:
  rng = _rng(seed, "pairs", split)
  pairs = _TarWriter(os.path.join(out, "pairs"), split, per_shard)
  vqa = _TarWriter(os.path.join(out, "vqa"), split, per_shard)
  os.makedirs(os.path.join(out, "images", split), exist_ok=True)
  questions, annotations, classes = [], [], []
  for i in range(n):
    scene = shapes.sample_scene(rng)
    img = shapes.render(scene, size, shapes.background(rng))
    cap = shapes.caption(scene)
    iid = image_id(split, i)
    key = f"{iid:07d}"
    jpg = _encode(img, "JPEG")
    meta = {"key": key, "image_id": iid, "caption": cap, "label": shapes.label(scene),
            "objects": [dataclasses.asdict(s) for s in scene]}
    pairs.add([(f"{key}.jpg", jpg), (f"{key}.txt", cap.encode()),
               (f"{key}.json", json.dumps(meta).encode())])
    file_name = f"{iid}.png"
    with open(os.path.join(out, "images", split, file_name), "wb") as f:
      f.write(_encode(img, "PNG"))
    karpathy.append({"filepath": split, "filename": file_name, "imgid": iid, "split": split,
                     "sentences": [{"raw": cap, "tokens": cap.replace(",", "").split()}]})
    qs = shapes.questions(scene)
    for j in rng.choice(len(qs), size=min(2, len(qs)), replace=False):
      q, a, qtype = qs[int(j)]
      qid = iid * 10 + int(j)
      text = f"Question: {q} Answer: {a}"
      vqa.add([(f"{key}_{j}.jpg", jpg), (f"{key}_{j}.txt", text.encode())])
      questions.append({"image_id": iid, "question": q, "question_id": qid})
      annotations.append({"image_id": iid, "question_id": qid, "question_type": qtype,
                          "answer_type": "other", "multiple_choice_answer": a,
                          "answers": [{"answer": a, "answer_confidence": "yes",
                                       "answer_id": k + 1} for k in range(10)]})
      if split == "train":
        corpus.append(text)
    if shapes.label(scene) >= 0:
      classes.append({"image": f"{split}/{file_name}", "label": shapes.label(scene)})
    if split == "train":
      corpus.append(cap)
  pairs.close()
  vqa.close()
  os.makedirs(os.path.join(out, "classification"), exist_ok=True)
  _write_json(os.path.join(out, "classification", f"{split}.json"), classes)
  _write_json(os.path.join(out, "vqa", f"{split}_questions.json"),
              {"data_subtype": split, "questions": questions})
  _write_json(os.path.join(out, "vqa", f"{split}_annotations.json"),
              {"annotations": annotations})
  return {"pairs": pairs.paths, "vqa": vqa.paths, "questions": len(questions),
          "classification": len(classes)}


def _write_documents(out: str, split: str, n: int, size: int, seed: int, per_shard: int,
                     corpus: list[str]) -> list[str]:
  rng = _rng(seed, "documents", split)
  w = _TarWriter(os.path.join(out, "interleaved"), split, per_shard)
  for i in range(n):
    texts, scenes = shapes.document(rng, DOCUMENT_IMAGES)
    key = f"{i:06d}"
    members, images = [], []
    for j, scene in enumerate(scenes):
      if scene is None:
        images.append(None)
        continue
      name = f"{key}.{j}.png"
      members.append((name, _encode(shapes.render(scene, size, shapes.background(rng)), "PNG")))
      images.append(name)
    doc = {"texts": texts, "images": images}
    w.add([(f"{key}.json", json.dumps(doc).encode()), *members])
    if split == "train":
      corpus.append(" ".join(t for t in texts if t))
  w.close()
  return w.paths


def _write_videos(out: str, split: str, n: int, size: int, seed: int, per_shard: int,
                  frames: int, corpus: list[str]) -> list[str]:
  rng = _rng(seed, "videos", split)
  w = _TarWriter(os.path.join(out, "video"), split, per_shard)
  for i in range(n):
    kind, colour, direction = shapes.sample_motion(rng)
    cap = shapes.motion_caption(kind, colour, direction)
    key = f"{i:06d}"
    members = [(f"{key}.json", json.dumps({"caption": cap, "fps": SOURCE_FPS}).encode())]
    for t, img in enumerate(shapes.render_motion(kind, colour, direction, size, frames, rng)):
      members.append((f"{key}.{t:04d}.jpg", _encode(img, "JPEG")))
    w.add(members)
    if split == "train":
      corpus.append(cap)
  w.close()
  return w.paths


def _corpus_fill(corpus: list[str], lines: int, seed: int) -> None:
  """Tops the corpus up with fresh captions, questions and motions (text only)."""
  rng = _rng(seed, "corpus", "train")
  while len(corpus) < lines:
    r = rng.random()
    scene = shapes.sample_scene(rng)
    if r < 0.4:
      corpus.append(shapes.caption(scene))
    elif r < 0.8:
      q, a, _ = shapes.questions(scene)[0 if r < 0.5 else -1]
      corpus.append(f"Question: {q} Answer: {a}")
    else:
      corpus.append(shapes.motion_caption(*shapes.sample_motion(rng)))


def dataset_configs(out: str, source: str = "arrayrecord", split: str = "train") -> dict:
  """Dataset configs (ConfigDict-ready dicts) reading one split that
  `write_synthetic` wrote; the sizes suit a tiny model on a CPU."""
  if source not in ("tar", "arrayrecord") or split not in SPLITS:
    raise ValueError(f"source must be tar or arrayrecord and split one of {SPLITS}, got "
                     f"{source!r}, {split!r}")
  pattern = "{d}/%s-*.tar" % split if source == "tar" else \
      "arrayrecord/{d}/%s-*.array_record" % split

  def one(kind, d, **kw):
    return {"kind": kind, "source": source, "paths": [os.path.join(out, pattern.format(d=d))],
            **kw}

  return {
      "pairs": one("pairs", "pairs", seq_len=32, batch_size=16, weight=0.2),
      "vqa": one("pairs", "vqa", seq_len=32, batch_size=16, weight=0.2),
      "interleaved": one("interleaved", "interleaved", seq_len=160,
                         max_images=DOCUMENT_IMAGES + 1,
                         p_next=0.5, batch_size=8, weight=1.0),
      "video": one("video", "video", seq_len=32, num_frames=8, fps=1.0, batch_size=4,
                   weight=0.03),
  }


def write_synthetic(out: str, seed: int = 0, image_size: int = 64, sizes: Sizes = Sizes(),
                    tokenizer: bool = True, arrayrecord: bool = True) -> dict:
  """Writes the demo dataset under `out`; returns (and writes) its manifest."""
  if image_size < 16:
    raise ValueError(f"image_size must be >= 16 to draw recognisable shapes, got {image_size}")
  for field in dataclasses.fields(sizes):
    value = getattr(sizes, field.name)
    if min(value if isinstance(value, tuple) else (value,)) < 1:
      flag = f"num_{field.name}" if field.name in ("pairs", "documents", "videos") else \
          field.name
      raise ValueError(f"synthetic sizes: {field.name} (--{flag}) must be >= 1, got {value}")
  t0 = time.time()
  os.makedirs(out, exist_ok=True)
  corpus: list[str] = []
  karpathy: list[dict] = []
  written: dict = {}
  for split_i, split in enumerate(SPLITS):
    written[split] = _write_pairs(out, split, sizes.pairs[split_i], image_size, seed,
                                  sizes.samples_per_shard, corpus, karpathy)
    written[split]["interleaved"] = _write_documents(
        out, split, sizes.documents[split_i], image_size, seed, sizes.samples_per_shard, corpus)
    written[split]["video"] = _write_videos(
        out, split, sizes.videos[split_i], image_size, seed, sizes.samples_per_shard,
        sizes.video_frames, corpus)
  _write_json(os.path.join(out, "classification", "classes.json"), list(shapes.CLASSES))
  os.makedirs(os.path.join(out, "captions"), exist_ok=True)
  _write_json(os.path.join(out, "captions", "dataset_shapes.json"), {"images": karpathy})
  _corpus_fill(corpus, sizes.corpus_lines, seed)
  with open(os.path.join(out, "corpus.txt"), "w") as f:
    f.write("\n".join(corpus) + "\n")
  if arrayrecord:
    for split in SPLITS:
      for kind_dir, kind in (("pairs", "pairs"), ("vqa", "pairs"),
                             ("interleaved", "interleaved"), ("video", "video")):
        convert(kind, written[split][kind_dir], os.path.join(out, "arrayrecord", kind_dir),
                prefix=split)
  info = None
  if tokenizer:
    from flamingo_jax.data.train_tokenizer import train_tokenizer
    tok = train_tokenizer([os.path.join(out, "corpus.txt")], sizes.vocab_size,
                          os.path.join(out, "tokenizer"), model_type="bpe")
    info = tok.info.to_dict()
  manifest = {
      "seed": seed, "image_size": image_size, "sizes": dataclasses.asdict(sizes),
      "source_fps": SOURCE_FPS, "classes": list(shapes.CLASSES),
      "examples": {split: {
          "pairs": sizes.pairs[i], "vqa": w["questions"], "interleaved": sizes.documents[i],
          "video": sizes.videos[i], "classification": w["classification"]}
          for i, (split, w) in enumerate(written.items())},
      "files": {split: {k: [os.path.relpath(p, out) for p in v] for k, v in w.items()
                        if isinstance(v, list)} for split, w in written.items()},
      "corpus_lines": len(corpus), "tokenizer": info,
      "data": {source: {split: dataset_configs(out, source, split) for split in SPLITS}
               for source in ("tar", "arrayrecord")},
  }
  _write_json(os.path.join(out, "manifest.json"), manifest, indent=2)
  manifest["seconds"] = round(time.time() - t0, 2)
  return manifest


def ensure_tokenizer(out: str, vocab_size: int = 512) -> str:
  """The demo tokenizer's path, training it from corpus.txt on demand."""
  path = os.path.join(out, "tokenizer", "tokenizer.model")
  if not os.path.exists(path):
    from flamingo_jax.data.train_tokenizer import train_tokenizer
    train_tokenizer([os.path.join(out, "corpus.txt")], vocab_size,
                    os.path.join(out, "tokenizer"), model_type="bpe")
  return path


def main(argv: Optional[list[str]] = None) -> None:
  p = ArgumentParser(prog="python -m flamingo_jax.data.synthetic",
                     description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image_size", type=int, default=64)
  d = Sizes()
  p.add_argument("--num_pairs", type=int, nargs=2, default=d.pairs, metavar=("TRAIN", "VAL"))
  p.add_argument("--num_documents", type=int, nargs=2, default=d.documents,
                 metavar=("TRAIN", "VAL"))
  p.add_argument("--num_videos", type=int, nargs=2, default=d.videos, metavar=("TRAIN", "VAL"))
  p.add_argument("--video_frames", type=int, default=d.video_frames,
                 help=f"frames per video, recorded at {SOURCE_FPS:g} FPS")
  p.add_argument("--corpus_lines", type=int, default=d.corpus_lines)
  p.add_argument("--vocab_size", type=int, default=d.vocab_size)
  p.add_argument("--no_tokenizer", action="store_true", help="train it later on demand")
  p.add_argument("--no_arrayrecord", action="store_true")
  a = p.parse_args(argv)
  sizes = Sizes(pairs=tuple(a.num_pairs), documents=tuple(a.num_documents),
                videos=tuple(a.num_videos), video_frames=a.video_frames,
                corpus_lines=a.corpus_lines, vocab_size=a.vocab_size)
  m = write_synthetic(a.out, a.seed, a.image_size, sizes, tokenizer=not a.no_tokenizer,
                      arrayrecord=not a.no_arrayrecord)
  print(json.dumps({"out": a.out, "seconds": m["seconds"], "examples": m["examples"],
                    "tokenizer": m["tokenizer"]}, sort_keys=True))


if __name__ == "__main__":
  sys.exit(run_cli(main))
