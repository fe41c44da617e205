"""Readers for the evaluation sets' annotation files, validated on load.

Each reader returns a list of frozen records and fails with a ValueError that
names the file, the entry and the missing or malformed field, so a wrong path
or a half-converted file stops before any model runs. Records know their
prompt fields (`prompt_fields()`, for `prompts.build_prompt`). Images (and
the videos of VATEX, MSVD-QA, MSRVTT-QA, in `image_path`) are returned as
paths; nothing here opens them. Layouts: docs/evaluation.md.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

KARPATHY_SPLITS = ("train", "restval", "val", "test")
# How VQA-style files name images, per dataset (questions' image_id -> file).
VQA_IMAGE_NAMING = {
    "coco": "COCO_{data_subtype}_{image_id:012d}.jpg",  # VQAv2, OK-VQA
    "filename": "{image_id}",  # VizWiz converted to the VQAv2 layout (OpenFlamingo's files)
    "id_jpg": "{image_id}.jpg",  # TextVQA converted to the VQAv2 layout (OpenFlamingo's files)
}
HATEFUL_MEMES_CLASS_NAMES = ("no", "yes")  # label 0, 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _load_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"evaluation file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def _get(entry: Any, field: str, path: str, where: str, types=None):
  """entry[field], or a ValueError naming the file, the entry and the field."""
  if not isinstance(entry, dict):
    raise ValueError(f"{path}: {where} should be an object, got {type(entry).__name__}")
  if field not in entry:
    raise ValueError(f"{path}: {where} is missing field {field!r}")
  value = entry[field]
  if types is not None:
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
      raise ValueError(f"{path}: {where} field {field!r} should be "
                       f"{'/'.join(t.__name__ for t in types)}, got "
                       f"{type(value).__name__}: {value!r}")
  return value


# --------------------------------------------------------------------------- captions


@dataclasses.dataclass(frozen=True)
class CaptionExample:
  """One image of COCO or Flickr30k (Karpathy splits) and its reference captions."""
  image_id: Union[int, str]
  image_path: str
  captions: tuple[str, ...]
  split: str

  def prompt_fields(self) -> dict:
    """The first reference caption as the demonstration (as OpenFlamingo)."""
    return {"image": self.image_path, "caption": self.captions[0]}


def read_karpathy_captions(path: str, splits: Union[str, Sequence[str]],
                           image_root: str = "") -> list[CaptionExample]:
  """COCO / Flickr30k captions from a Karpathy split file (`dataset_coco.json`).

  splits: "test", "val", or ("train", "restval") for the 113k-image Karpathy
    training set of COCO; Flickr30k has no "restval".
  image_id: "cocoid" where present (COCO), else "imgid"; image_path:
    image_root / filepath (COCO's "train2014"/"val2014", if present) / filename.
  """
  splits = (splits,) if isinstance(splits, str) else tuple(splits)
  unknown = [s for s in splits if s not in KARPATHY_SPLITS]
  if unknown or not splits:
    raise ValueError(f"read_karpathy_captions: unknown split(s) {unknown or splits}; "
                     f"choose from {KARPATHY_SPLITS}")
  data = _load_json(path)
  images = _get(data, "images", path, "the top level", list)
  out = []
  for i, img in enumerate(images):
    where = f"images[{i}]"
    split = _get(img, "split", path, where, str)
    filename = _get(img, "filename", path, where, str)
    sentences = _get(img, "sentences", path, where, list)
    if split not in splits:
      continue
    if not sentences:
      raise ValueError(f"{path}: {where} ({filename}) has no sentences")
    captions = tuple(_get(s, "raw", path, f"{where}.sentences[{j}]", str)
                     for j, s in enumerate(sentences))
    if "cocoid" in img:
      image_id = _get(img, "cocoid", path, where, (int, str))
    else:
      image_id = _get(img, "imgid", path, f"{where} (no 'cocoid')", (int, str))
    sub = img.get("filepath", "")
    out.append(CaptionExample(image_id=image_id,
                              image_path=os.path.join(image_root, sub, filename),
                              captions=captions, split=split))
  ids = collections.Counter(ex.image_id for ex in out)
  dupes = [k for k, c in ids.items() if c > 1]
  if dupes:
    raise ValueError(f"{path}: image ids repeat within splits {splits}: {dupes[:5]}")
  return out


# ------------------------------------------------------------------------------- VQA


@dataclasses.dataclass(frozen=True)
class VQAExample:
  """One question of VQAv2, OK-VQA, VizWiz or TextVQA (VQAv2 file layout)."""
  question_id: Union[int, str]
  image_id: Union[int, str]
  image_path: str
  question: str
  answers: tuple[str, ...]  # the 10 human answers; () without annotations
  question_type: Optional[str] = None
  answer_type: Optional[str] = None

  def prompt_fields(self, answer: str = "most_common") -> dict:
    """Question and demonstration answer: the most common human answer (first on
    a tie, VQA's "multiple_choice_answer"), or answer="first" as OpenFlamingo."""
    fields = {"image": self.image_path, "question": self.question}
    if self.answers:
      if answer == "most_common":
        counts = collections.Counter(self.answers)
        fields["answer"] = max(self.answers, key=lambda a: counts[a])  # first max wins
      elif answer == "first":
        fields["answer"] = self.answers[0]
      else:
        raise ValueError(f"answer must be 'most_common' or 'first', got {answer!r}")
    return fields


def read_vqa(questions_path: str, annotations_path: Optional[str] = None, *,
             image_root: str = "", image_naming: str = "coco") -> list[VQAExample]:
  """Questions (and, unless None, annotations) in the VQAv2 JSON layout.

  image_naming: a key of VQA_IMAGE_NAMING ("coco" for VQAv2/OK-VQA,
    "filename" for VizWiz, "id_jpg" for TextVQA) or a format string with
    {image_id} and optionally {data_subtype} (the questions file's field).
  Without annotations (test-dev) the examples have no answers.
  """
  pattern = VQA_IMAGE_NAMING.get(image_naming, image_naming)
  if "{image_id" not in pattern:
    raise ValueError(f"read_vqa: image_naming {image_naming!r} is neither one of "
                     f"{tuple(VQA_IMAGE_NAMING)} nor a format string with {{image_id}}")
  qdata = _load_json(questions_path)
  questions = _get(qdata, "questions", questions_path, "the top level", list)
  subtype = qdata.get("data_subtype")
  if "{data_subtype" in pattern and not isinstance(subtype, str):
    raise ValueError(f"{questions_path}: the top level is missing field 'data_subtype' "
                     f"(e.g. 'val2014'), needed to name images as {pattern!r}")
  annotations = {}
  if annotations_path is not None:
    adata = _load_json(annotations_path)
    for i, ann in enumerate(_get(adata, "annotations", annotations_path, "the top level",
                                 list)):
      where = f"annotations[{i}]"
      qid = _get(ann, "question_id", annotations_path, where, (int, str))
      answers = _get(ann, "answers", annotations_path, where, list)
      if not answers:
        raise ValueError(f"{annotations_path}: {where} (question {qid}) has no answers")
      texts = tuple(_get(a, "answer", annotations_path, f"{where}.answers[{j}]", str)
                    for j, a in enumerate(answers))
      annotations[qid] = (ann, texts, where)
  out, seen = [], set()
  for i, q in enumerate(questions):
    where = f"questions[{i}]"
    qid = _get(q, "question_id", questions_path, where, (int, str))
    image_id = _get(q, "image_id", questions_path, where, (int, str))
    text = _get(q, "question", questions_path, where, str)
    if qid in seen:
      raise ValueError(f"{questions_path}: question_id {qid} appears twice")
    seen.add(qid)
    try:
      name = pattern.format(image_id=image_id, data_subtype=subtype)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{questions_path}: {where} image_id {image_id!r} does not fit the "
                       f"image naming {pattern!r} ({e})") from None
    answers, qtype, atype = (), None, None
    if annotations_path is not None:
      if qid not in annotations:
        raise ValueError(f"{annotations_path}: no annotation for question_id {qid} "
                         f"({questions_path} {where})")
      ann, answers, awhere = annotations[qid]
      if "image_id" in ann and ann["image_id"] != image_id:
        raise ValueError(f"{annotations_path}: {awhere} has image_id {ann['image_id']} "
                         f"but question {qid} has image_id {image_id}")
      qtype, atype = ann.get("question_type"), ann.get("answer_type")
    out.append(VQAExample(question_id=qid, image_id=image_id,
                          image_path=os.path.join(image_root, name), question=text,
                          answers=answers, question_type=qtype, answer_type=atype))
  return out


def read_textvqa(path: str, image_root: str = "") -> list[VQAExample]:
  """TextVQA as released (`TextVQA_0.5.1_{train,val,test}.json`):

    {"dataset_name": "textvqa", "data": [{"question_id": 34602, "image_id":
     "003a8ae2ef43b901", "question": "...", "answers": [10 strings], ...}]}

  Images are `image_root/{image_id}.jpg` (train and val images both live in
  `train_images/`). The test file has no "answers": its examples have none.
  """
  data = _load_json(path)
  entries = _get(data, "data", path, "the top level", list)
  out, seen = [], set()
  for i, e in enumerate(entries):
    where = f"data[{i}]"
    qid = _get(e, "question_id", path, where, (int, str))
    image_id = _get(e, "image_id", path, where, str)
    question = _get(e, "question", path, where, str)
    if qid in seen:
      raise ValueError(f"{path}: question_id {qid} appears twice")
    seen.add(qid)
    answers = ()
    if "answers" in e:
      answers = tuple(_get(e, "answers", path, where, list))
      bad = [j for j, a in enumerate(answers) if not isinstance(a, str)]
      if bad:
        raise ValueError(f"{path}: {where}.answers[{bad[0]}] should be a string")
    out.append(VQAExample(question_id=qid, image_id=image_id,
                          image_path=os.path.join(image_root, f"{image_id}.jpg"),
                          question=question, answers=answers))
  return out


def read_vizwiz(path: str, image_root: str = "") -> list[VQAExample]:
  """VizWiz-VQA as released (`Annotations/{train,val,test}.json`): a list of

    {"image": "VizWiz_val_00000000.jpg", "question": "...", "answerable": 1,
     "answer_type": "other", "answers": [{"answer": "...", "answer_confidence":
     "yes"} x 10]}

  Images are `image_root/{image}`; the image name is the question id (one
  question per image). The test file has no "answers".
  """
  data = _load_json(path)
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected the released VizWiz layout, a JSON list of "
                     "{'image', 'question', 'answers'} objects")
  out, seen = [], set()
  for i, e in enumerate(data):
    where = f"entry {i}"
    image = _get(e, "image", path, where, str)
    question = _get(e, "question", path, where, str)
    if image in seen:
      raise ValueError(f"{path}: image {image!r} appears twice")
    seen.add(image)
    answers = ()
    if "answers" in e:
      answers = tuple(_get(a, "answer", path, f"{where}.answers[{j}]", str)
                      for j, a in enumerate(_get(e, "answers", path, where, list)))
    atype = e.get("answer_type")
    out.append(VQAExample(question_id=image, image_id=image,
                          image_path=os.path.join(image_root, image), question=question,
                          answers=answers, answer_type=atype if isinstance(atype, str) else None))
  return out


# ---------------------------------------------------------------------- classification


@dataclasses.dataclass(frozen=True)
class ClassificationExample:
  """One image of ImageNet-style classification."""
  image_path: str
  label: int
  class_name: str

  def prompt_fields(self) -> dict:
    return {"image": self.image_path, "class_name": self.class_name}


def read_class_names(path: str) -> tuple[str, ...]:
  """Class names in label order: a .txt file (one per line) or a JSON list, or a
  JSON object {"0": name, "1": name, ...}."""
  if path.endswith(".txt"):
    try:
      with open(path) as f:
        names = [line.rstrip("\n") for line in f]
    except FileNotFoundError:
      raise FileNotFoundError(f"evaluation file not found: {path}") from None
    while names and not names[-1]:
      names.pop()
  else:
    data = _load_json(path)
    if isinstance(data, dict):
      try:
        keys = sorted(data, key=int)
      except ValueError:
        raise ValueError(f"{path}: a class-name object needs keys '0', '1', ...") from None
      if [int(k) for k in keys] != list(range(len(keys))):
        raise ValueError(f"{path}: class indices must be 0..{len(keys) - 1} without gaps")
      names = [data[k] for k in keys]
    elif isinstance(data, list):
      names = data
    else:
      raise ValueError(f"{path}: expected a list of class names or an index->name object")
  bad = [i for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()]
  if bad or not names:
    raise ValueError(f"{path}: class names must be non-empty strings; bad entries at "
                     f"{bad[:5] or 'all (file is empty)'}")
  return tuple(names)


def _resolve_names(source: str, num: int, class_names, keys: Sequence[str]) -> list[str]:
  if class_names is None:
    return list(keys)
  if isinstance(class_names, Mapping):
    missing = [k for k in keys if k not in class_names]
    if missing:
      raise ValueError(f"{source}: class_names has no entry for {missing[:5]}")
    return [class_names[k] for k in keys]
  if len(class_names) != num:
    raise ValueError(f"{source}: {num} classes but {len(class_names)} class names")
  return list(class_names)


def read_image_folder(root: str, class_names: Union[Sequence[str], Mapping[str, str],
                                                    None] = None,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS
                      ) -> list[ClassificationExample]:
  """root/<class folder>/<image>: labels are the sorted folder order (as torchvision).

  class_names: names in that order, or folder -> name (ImageNet: wnid ->
    name); None uses the folder names.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder not found: {root}")
  folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not folders:
    raise ValueError(f"{root}: no class folders")
  names = _resolve_names(root, len(folders), class_names, folders)
  exts = tuple(e.lower() for e in extensions)
  out = []
  for label, (folder, name) in enumerate(zip(folders, names)):
    files = sorted(f for f in os.listdir(os.path.join(root, folder))
                   if f.lower().endswith(exts))
    if not files:
      raise ValueError(f"{root}: class folder {folder!r} has no images ({', '.join(exts)})")
    out.extend(ClassificationExample(os.path.join(root, folder, f), label, name)
               for f in files)
  return out


def read_classification_list(path: str, class_names: Sequence[str],
                             image_root: str = "") -> list[ClassificationExample]:
  """A JSON list of {"image": relative path, "label": int} in `class_names` order."""
  data = _load_json(path)
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of {{'image', 'label'}} objects")
  names = list(class_names)
  out = []
  for i, entry in enumerate(data):
    image = _get(entry, "image", path, f"entry {i}", str)
    label = _get(entry, "label", path, f"entry {i}", int)
    if not 0 <= label < len(names):
      raise ValueError(f"{path}: entry {i} label {label} is outside [0, {len(names)})")
    out.append(ClassificationExample(os.path.join(image_root, image), label, names[label]))
  return out


# ----------------------------------------------------------------------- hateful memes


@dataclasses.dataclass(frozen=True)
class HatefulMemesExample:
  """One meme: its image, the text written on it, and label 1 = hateful."""
  id: Union[int, str]
  image_path: str
  text: str
  label: Optional[int]

  def prompt_fields(self) -> dict:
    fields = {"image": self.image_path, "text": self.text}
    if self.label is not None:
      fields["label"] = HATEFUL_MEMES_CLASS_NAMES[self.label]
    return fields


def read_hateful_memes(path: str, image_root: str = "", *,
                       require_labels: bool = True) -> list[HatefulMemesExample]:
  """HatefulMemes jsonl: one {"id", "img", "text", "label"} object per line.

  The unlabelled test files have no "label": pass require_labels=False.
  """
  try:
    with open(path) as f:
      lines = f.readlines()
  except FileNotFoundError:
    raise FileNotFoundError(f"evaluation file not found: {path}") from None
  out = []
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"line {n}"
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: {where} is not valid JSON ({e})") from None
    meme_id = _get(entry, "id", path, where, (int, str))
    img = _get(entry, "img", path, where, str)
    text = _get(entry, "text", path, where, str)
    label = None
    if require_labels or "label" in entry:
      label = _get(entry, "label", path, where, int)
      if label not in (0, 1):
        raise ValueError(f"{path}: {where} label must be 0 or 1, got {label}")
    out.append(HatefulMemesExample(meme_id, os.path.join(image_root, img), text, label))
  if not out:
    raise ValueError(f"{path}: no memes")
  return out


# ------------------------------------------------------------------------------ video

VIDEO_EXTENSIONS = {"msvd_qa": ".avi", "msrvtt_qa": ".mp4", "vatex": ".mp4"}  # as released


def video_path(root: str, name: str, ext: str) -> str:
  """root/name + ext, or the folder root/name of its extracted frames when only that exists."""
  file = os.path.join(root, name + ext)
  folder = os.path.join(root, name)
  return folder if not os.path.exists(file) and os.path.isdir(folder) else file


def read_youtube_mapping(path: str) -> dict[str, str]:
  """MSVD-QA's `youtube_mapping.txt`: lines "<clip name> vid<N>" -> {"vid<N>": clip name}."""
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise FileNotFoundError(f"evaluation file not found: {path}") from None
  out = {}
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2 or not parts[1].startswith("vid"):
      raise ValueError(f"{path}: line {n} should be '<youtube clip name> vid<N>', got {line!r}")
    out[parts[1]] = parts[0]
  return out


def _read_qa_list(path: str, name_of, video_root: str, ext: str) -> list[VQAExample]:
  data = _load_json(path)
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of {{'question', 'answer', 'id', "
                     "'video_id'}} objects (the released *_qa.json)")
  out, seen = [], set()
  for i, e in enumerate(data):
    where = f"entry {i}"
    qid = _get(e, "id", path, where, (int, str))
    video_id = _get(e, "video_id", path, where, (int, str))
    question = _get(e, "question", path, where, str)
    answer = _get(e, "answer", path, where, str)
    if qid in seen:
      raise ValueError(f"{path}: id {qid} appears twice")
    seen.add(qid)
    out.append(VQAExample(question_id=qid, image_id=video_id,
                          image_path=video_path(video_root, name_of(video_id, where), ext),
                          question=question, answers=(answer,)))
  return out


def read_msvd_qa(path: str, mapping_path: str, video_root: str = "",
                 ext: str = VIDEO_EXTENSIONS["msvd_qa"]) -> list[VQAExample]:
  """MSVD-QA as released (`{train,val,test}_qa.json`): a list of

    {"answer": "man", "id": 0, "question": "who is cutting a tomato?", "video_id": 1}

  `video_id` N is the clip `youtube_mapping.txt` names "vid<N>"; the video is
  `video_root/<clip name>.avi` (MSVD's YouTubeClips). One answer per question:
  `image_id` holds the video id, `image_path` the video.
  """
  mapping = read_youtube_mapping(mapping_path)

  def name_of(video_id, where):
    key = f"vid{video_id}"
    if key not in mapping:
      raise ValueError(f"{path}: {where} video_id {video_id} has no line '... {key}' in "
                       f"{mapping_path}")
    return mapping[key]

  return _read_qa_list(path, name_of, video_root, ext)


def read_msrvtt_qa(path: str, video_root: str = "",
                   ext: str = VIDEO_EXTENSIONS["msrvtt_qa"]) -> list[VQAExample]:
  """MSRVTT-QA as released (`{train,val,test}_qa.json`): a list of

    {"answer": "clothes", "category_id": 0, "id": 0, "question": "...", "video_id": 0}

  The video is `video_root/video<video_id>.mp4` (MSR-VTT's TrainValVideo/ for train
  and val, video0..7009; TestVideo/ for test, video7010..9999).
  """
  return _read_qa_list(path, lambda video_id, where: f"video{video_id}", video_root, ext)


def read_vatex(path: str, video_root: str = "",
               ext: str = VIDEO_EXTENSIONS["vatex"]) -> list[CaptionExample]:
  """VATEX as released (`vatex_{training,validation}_v1.0.json`): a list of

    {"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": [10 English captions], "chCap": [...]}

  The video is `video_root/<videoID>.mp4` (the 10 s YouTube clip <id>_<start>_<end>);
  the English captions are the references.
  """
  data = _load_json(path)
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of {{'videoID', 'enCap'}} objects "
                     "(the released vatex_*_v1.0.json)")
  out, seen = [], set()
  for i, e in enumerate(data):
    where = f"entry {i}"
    vid = _get(e, "videoID", path, where, str)
    caps = _get(e, "enCap", path, where, list)
    if not caps or not all(isinstance(c, str) for c in caps):
      raise ValueError(f"{path}: {where} ({vid}) field 'enCap' should be a non-empty list "
                       "of strings")
    if vid in seen:
      raise ValueError(f"{path}: videoID {vid!r} appears twice")
    seen.add(vid)
    out.append(CaptionExample(image_id=vid, image_path=video_path(video_root, vid, ext),
                              captions=tuple(caps), split=""))
  return out
