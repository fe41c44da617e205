"""The embedded shapes-world dataset: deterministic, in the real formats, readable back."""
import glob
import hashlib
import json
import os
import tarfile

import numpy as np
import pytest

from flamingo_jax.data import Tokenizer, images, shapes, synthetic
from flamingo_jax.data.sources import ArrayRecordSource
from flamingo_jax.data.tar import TarSource
from data_helpers import SHAPES_IMAGE_SIZE, SHAPES_SEED, SHAPES_SIZES, write_shapes_world


def digest(root):
  out = {}
  for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
    if os.path.isfile(path) and not path.endswith("manifest.json"):
      out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def test_deterministic_from_the_seed(shapes_world, tmp_path):
  out, _ = shapes_world
  again = str(tmp_path / "again")
  write_shapes_world(again)
  assert digest(again) == digest(out)
  other = str(tmp_path / "other")
  synthetic.write_synthetic(other, seed=SHAPES_SEED + 1, image_size=SHAPES_IMAGE_SIZE,
                            sizes=SHAPES_SIZES, tokenizer=False, arrayrecord=False)
  a, b = digest(out), digest(other)
  assert a["pairs/train-00000.tar"] != b["pairs/train-00000.tar"]


def test_every_format_reads_back(shapes_world):
  out, manifest = shapes_world
  assert manifest["examples"]["train"]["vqa"] == 2 * SHAPES_SIZES.pairs[0]
  for split, i in (("train", 0), ("val", 1)):
    pairs = TarSource("pairs", sorted(glob.glob(f"{out}/pairs/{split}-*.tar")))
    docs = TarSource("interleaved", sorted(glob.glob(f"{out}/interleaved/{split}-*.tar")))
    vids = TarSource("video", sorted(glob.glob(f"{out}/video/{split}-*.tar")))
    assert (len(pairs), len(docs), len(vids)) == (
        SHAPES_SIZES.pairs[i], SHAPES_SIZES.documents[i], SHAPES_SIZES.videos[i])
    for kind, d, n in (("pairs", "pairs", SHAPES_SIZES.pairs[i]),
                       ("pairs", "vqa", 2 * SHAPES_SIZES.pairs[i]),
                       ("interleaved", "interleaved", SHAPES_SIZES.documents[i]),
                       ("video", "video", SHAPES_SIZES.videos[i])):
      files = sorted(glob.glob(f"{out}/arrayrecord/{d}/{split}-*.array_record"))
      ar = ArrayRecordSource(kind, files)
      assert len(ar) == n
  doc = docs[0]
  assert sum(im is not None for im in doc["images"]) >= 2
  # Every kind of document ends with text (a story's total; a gallery's, quiz's or naming
  # page's text about its last picture): tests/test_demo_names.py checks each kind.
  assert doc["texts"][-1] and doc["images"][-1] is None
  vid = vids[0]
  assert len(vid["frames"]) == SHAPES_SIZES.video_frames and vid["fps"] == synthetic.SOURCE_FPS
  assert " moves " in vid["text"]


def test_captions_describe_the_pixels(shapes_world):
  out, _ = shapes_world
  vocab = {"a", "on", "the", "in", "and", *shapes.COLOURS, *shapes.SHAPES, *shapes.POSITIONS}
  src = TarSource("pairs", sorted(glob.glob(f"{out}/pairs/train-*.tar")))
  for i in range(len(src)):
    rec = src[i]
    assert set(rec["text"].replace(",", " ").split()) <= vocab
    assert images.decode(rec["image"]).shape == (SHAPES_IMAGE_SIZE, SHAPES_IMAGE_SIZE, 3)
  # The centre pixel of every shape has the colour its caption names.
  with tarfile.open(sorted(glob.glob(f"{out}/pairs/train-*.tar"))[0]) as tf:
    metas = [json.load(tf.extractfile(m)) for m in tf if m.name.endswith(".json")]
  assert metas
  for meta in metas:
    png = images.decode(open(f"{out}/images/train/{meta['image_id']}.png", "rb").read())
    for obj in meta["objects"]:
      x, y = int(obj["x"] * SHAPES_IMAGE_SIZE), int(obj["y"] * SHAPES_IMAGE_SIZE)
      np.testing.assert_allclose(png[y, x], shapes.COLOURS[obj["colour"]], atol=2)
      assert f"{obj['colour']} {obj['kind']} {shapes.WHERE[obj['position']]}" in meta["caption"]


def test_evaluation_files_read_with_the_evaluation_readers(shapes_world):
  from flamingo_jax.evaluate import datasets as ev
  out, _ = shapes_world
  caps = ev.read_karpathy_captions(f"{out}/captions/dataset_shapes.json", ("train", "val"),
                                   image_root=f"{out}/images")
  assert len(caps) == sum(SHAPES_SIZES.pairs)
  assert all(os.path.exists(c.image_path) for c in caps)
  vqa = ev.read_vqa(f"{out}/vqa/val_questions.json", f"{out}/vqa/val_annotations.json",
                    image_root=f"{out}/images", image_naming="{data_subtype}/{image_id}.png")
  assert len(vqa) == 2 * SHAPES_SIZES.pairs[1]
  assert all(os.path.exists(q.image_path) and len(q.answers) == 10 for q in vqa)
  names = ev.read_class_names(f"{out}/classification/classes.json")
  assert names == shapes.CLASSES
  cls = ev.read_classification_list(f"{out}/classification/train.json", names,
                                    image_root=f"{out}/images")
  for ex in cls:
    assert os.path.exists(ex.image_path) and ex.class_name in shapes.CLASSES


def test_corpus_tokenizer_and_configs(shapes_world, tmp_path):
  out, manifest = shapes_world
  tok = Tokenizer.load(f"{out}/tokenizer/tokenizer.model")
  assert manifest["tokenizer"] == tok.info.to_dict()
  lines = open(f"{out}/corpus.txt").read().splitlines()
  assert len(lines) == SHAPES_SIZES.corpus_lines
  for line in lines[:50]:
    ids = tok.encode(line)
    assert tok.decode(ids) == line and 1 not in ids  # no <unk> in the shapes_world's own text
  cfgs = synthetic.dataset_configs(out, "tar", "val")
  assert set(cfgs) == {"pairs", "vqa", "interleaved", "video"}
  assert manifest["data"]["arrayrecord"]["train"]["video"]["num_frames"] == 8
  # The tokenizer can also be trained later, on demand.
  synthetic.main(["--out", str(tmp_path), "--num_pairs", "3", "1", "--num_documents", "2", "1",
                  "--num_videos", "1", "1", "--corpus_lines", "100", "--no_tokenizer",
                  "--no_arrayrecord", "--image_size", "16"])
  assert not os.path.exists(tmp_path / "tokenizer")
  path = synthetic.ensure_tokenizer(str(tmp_path), vocab_size=200)
  assert Tokenizer.load(path).info.vocab_size > 20
  with pytest.raises(ValueError, match="image_size must be >= 16"):
    synthetic.write_synthetic(str(tmp_path / "x"), image_size=8)
