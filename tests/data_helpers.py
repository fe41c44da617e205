"""Data helpers the tests share (not a test module): tiny tar shards, images, the
tokenizer and shapes-world recipes of conftest.py's session fixtures, DataConfigs."""
import io
import os
import tarfile

import numpy as np
from PIL import Image

from flamingo_jax.data import data_config, synthetic
from flamingo_jax.data.tokenizer import TokenizerInfo
from flamingo_jax.data.train_tokenizer import train_tokenizer

# Hand-written ids for layout tests: text tokens are 10..50.
INFO = TokenizerInfo(vocab_size=100, bos_id=1, eos_id=2, pad_id=0, image_token_id=98,
                     eoc_token_id=99)
BOS, EOS, PAD, IMG, EOC = 1, 2, 0, 98, 99

CORPUS = [
    "a red circle on the left", "a blue square on the right", "a green triangle in the middle",
    "sample number one two three four five six seven eight nine ten",
    "Question: how many shapes are there? Answer: two", "the quick brown fox jumps",
    "a yellow square moves up", "a purple circle moves down", "In total there are shapes.",
]


def image_bytes(colour=(200, 30, 30), size=(24, 16), fmt="JPEG") -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format=fmt)
  return buf.getvalue()


def write_tar(path, members) -> str:
  """members: [(name, bytes | str)] in order."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, "w") as tf:
    for name, data in members:
      if isinstance(data, str):
        data = data.encode()
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return str(path)


def pair_members(i: int, caption: str = None, colour=None):
  colour = colour or (int(i * 37 % 256), 100, 50)
  return [(f"{i:06d}.jpg", image_bytes(colour)),
          (f"{i:06d}.txt", caption if caption is not None else f"sample number {i}")]


def train_small_tokenizer(tmp_dir) -> str:
  """tokenizer.model of a 200-piece BPE on CORPUS (it knows digits; the shapes world's
  does not): <image> 200, <EOC> 201."""
  corpus = os.path.join(tmp_dir, "corpus.txt")
  with open(corpus, "w") as f:
    for k in range(40):
      f.write("\n".join(CORPUS) + f"\nsample number {k}\n")
  train_tokenizer([corpus], 200, os.path.join(tmp_dir, "tok"), model_type="bpe")
  return os.path.join(tmp_dir, "tok", "tokenizer.model")


# The shapes world of conftest.py's `shapes_world`: every format, 32 px images.
SHAPES_SEED, SHAPES_IMAGE_SIZE = 1, 32
SHAPES_SIZES = synthetic.Sizes(pairs=(24, 8), documents=(16, 4), videos=(8, 2), video_frames=8,
                               corpus_lines=500, vocab_size=300, samples_per_shard=10)


def write_shapes_world(out: str) -> dict:
  """The shapes world (tars, ArrayRecord, evaluation files, tokenizer) -> its manifest."""
  return synthetic.write_synthetic(out, seed=SHAPES_SEED, image_size=SHAPES_IMAGE_SIZE,
                                   sizes=SHAPES_SIZES)


def make_data(datasets, tokenizer, **overrides):
  """A validated DataConfig for tests: one shard, no threads, 32 px images."""
  cfg = {"datasets": datasets, "tokenizer": tokenizer, "image": {"size": 32},
         "shard_index": 0, "shard_count": 1, "read_threads": 0, "read_buffer_size": 0,
         "skip_check_after": 10_000}
  cfg.update(overrides)
  return data_config(cfg)


def as_numpy_batches(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    if set(x) != set(y):
      raise AssertionError(f"keys differ: {sorted(x)} vs {sorted(y)}")
    for k in x:
      if isinstance(x[k], dict):
        assert_batches_equal([x[k]], [y[k]])
      else:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)
