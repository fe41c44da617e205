"""What the model reads in evaluation (and in `python -m flamingo_jax.generate`): image
files as the model's pixels, prompts as token ids, a task's files as examples.

Images: the longer side resized to the model's size, centred on a mean-coloured
square, (x - mean) / std in 0..255 units (ImageNet's by default). Prompts: `<BOS>`
and the text pieces tokenized one by one, the `<image>` / `<EOC>` markers as
their ids, as the training pipeline tokenizes documents.
"""
from __future__ import annotations

import functools
import json
import os
import re

import numpy as np

from flamingo_jax.config import check
from flamingo_jax.data import images as images_lib
from flamingo_jax.data.config import IMAGENET_MEAN, IMAGENET_STD, ImageConfig
from flamingo_jax.evaluate import datasets, prompts
from flamingo_jax.evaluate.config import EvalTaskConfig


@functools.lru_cache(maxsize=256)
def load_image(path: str, size: int, mean: tuple = IMAGENET_MEAN,
               std: tuple = IMAGENET_STD) -> np.ndarray:
  """An image file -> float32 [1, size, size, 3]: the longer side resized to `size`
  (aspect kept), centred on a mean-coloured square, (x - mean) / std."""
  data = images_lib.read_file(path)
  try:
    arr = images_lib.decode(data, size)
  except images_lib.BadImage as e:
    raise ValueError(f"image {path!r}: {e}") from None
  cfg = ImageConfig(size=size, mean=tuple(mean), std=tuple(std), flip=False, colour_jitter=0.0)
  return images_lib.process([arr], cfg, None, train=False)


_MARKERS = re.compile("(" + re.escape(prompts.IMAGE_MARKER) + "|" + re.escape(prompts.EOC_MARKER)
                      + ")")


def encode_prompt(text: str, tokenizer) -> list[int]:
  """`<BOS>` (unless the tokenizer's `add_bos` says none: OpenFlamingo's GPT-NeoX / MPT
  tokenizers) + the prompt's text pieces tokenized one by one, markers as their ids
  (as the training pipeline does, so text never encodes to `<image>`/`<EOC>`)."""
  info = tokenizer.info
  ids = [info.bos_id] if getattr(tokenizer, "add_bos", True) else []
  for piece in _MARKERS.split(text):
    if piece == prompts.IMAGE_MARKER:
      ids.append(info.image_token_id)
    elif piece == prompts.EOC_MARKER:
      ids.append(info.eoc_token_id)
    elif piece:
      ids.extend(tokenizer.encode(piece))
  return ids


def continuation_ids(tokenizer, context: str, continuation: str) -> list[int]:
  """The ids `continuation` gets when it follows `context` in one text piece.

  Options are scored as the tokens they would have after the prompt, not as
  a separately tokenized string (which would start a new word differently).
  """
  ctx = tokenizer.encode(context)
  full = tokenizer.encode(context + continuation)
  if full[:len(ctx)] == ctx and len(full) > len(ctx):
    return full[len(ctx):]
  return tokenizer.encode(continuation)


def prompt_fields(ex, t: EvalTaskConfig) -> dict:
  """An example's template slots (a VQA demonstration's answer as the task picks it)."""
  if isinstance(ex, datasets.VQAExample):
    return ex.prompt_fields(answer=t.vqa_demo_answer)
  return ex.prompt_fields()


def _read_coco_captions(path: str, image_root: str) -> list:
  """COCO's captions_*.json ({"images": [{id, file_name}], "annotations":
  [{image_id, caption}]}) -> CaptionExamples, one per image with a caption."""
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"evaluation file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  for key in ("images", "annotations"):
    check(isinstance(data, dict) and isinstance(data.get(key), list),
          f"{path}: the top level is missing list field {key!r} (COCO captions layout)")
  files = {}
  for i, img in enumerate(data["images"]):
    check(isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str),
          f"{path}: images[{i}] needs 'id' and 'file_name'")
    files[img["id"]] = img["file_name"]
  caps: dict = {}
  for i, ann in enumerate(data["annotations"]):
    check(isinstance(ann, dict) and isinstance(ann.get("caption"), str)
          and ann.get("image_id") in files,
          f"{path}: annotations[{i}] needs a 'caption' and an 'image_id' listed in images")
    caps.setdefault(ann["image_id"], []).append(ann["caption"])
  return [datasets.CaptionExample(image_id=k, image_path=os.path.join(image_root, files[k]),
                                  captions=tuple(v), split="all") for k, v in caps.items()]


def load_task_data(t: EvalTaskConfig) -> tuple[list, list, tuple]:
  """-> (support examples, evaluated examples, class names or ())."""
  if t.format == "vatex":
    ext = t.video_ext or datasets.VIDEO_EXTENSIONS["vatex"]
    return (datasets.read_vatex(t.train, t.train_image_root, ext),
            datasets.read_vatex(t.test, t.test_image_root, ext), ())
  if t.kind == "captioning":
    if t.format == "karpathy":
      return (datasets.read_karpathy_captions(t.train, t.train_splits, t.train_image_root),
              datasets.read_karpathy_captions(t.test, t.test_splits, t.test_image_root), ())
    return (_read_coco_captions(t.train, t.train_image_root),
            _read_coco_captions(t.test, t.test_image_root), ())
  if t.format == "msvd_qa":
    ext = t.video_ext or datasets.VIDEO_EXTENSIONS["msvd_qa"]
    return (datasets.read_msvd_qa(t.train, t.video_mapping, t.train_image_root, ext),
            datasets.read_msvd_qa(t.test, t.video_mapping, t.test_image_root, ext), ())
  if t.format == "msrvtt_qa":
    ext = t.video_ext or datasets.VIDEO_EXTENSIONS["msrvtt_qa"]
    return (datasets.read_msrvtt_qa(t.train, t.train_image_root, ext),
            datasets.read_msrvtt_qa(t.test, t.test_image_root, ext), ())
  if t.kind == "vqa" and t.format == "textvqa":
    return (datasets.read_textvqa(t.train, t.train_image_root),
            datasets.read_textvqa(t.test, t.test_image_root), ())
  if t.kind == "vqa" and t.format == "vizwiz":
    return (datasets.read_vizwiz(t.train, t.train_image_root),
            datasets.read_vizwiz(t.test, t.test_image_root), ())
  if t.kind == "vqa":
    kw = dict(image_naming=t.image_naming)
    return (datasets.read_vqa(t.train, t.train_annotations, image_root=t.train_image_root, **kw),
            datasets.read_vqa(t.test, t.test_annotations, image_root=t.test_image_root, **kw),
            ())
  if t.kind == "classification":
    names = datasets.read_class_names(t.class_names) if t.class_names else None
    if t.format == "folder":
      train = datasets.read_image_folder(t.train, names)
      test = datasets.read_image_folder(t.test, names)
      names = names or tuple(dict.fromkeys(ex.class_name for ex in train))
      return train, test, tuple(names)
    return (datasets.read_classification_list(t.train, names, t.train_image_root),
            datasets.read_classification_list(t.test, names, t.test_image_root), tuple(names))
  return (datasets.read_hateful_memes(t.train, t.train_image_root),
          datasets.read_hateful_memes(t.test, t.test_image_root),
          datasets.HATEFUL_MEMES_CLASS_NAMES)
