"""Bad data never stops a run and never goes unnoticed: each case skipped and counted."""
import base64
import io
import json
import logging
import sys

import numpy as np
import pytest
from PIL import Image

from data_helpers import image_bytes, make_data, pair_members, write_tar
from flamingo_jax.data import SkipRateError, Tokenizer, layouts, make_dataset, make_mixture
from flamingo_jax.data.records import encode_record
from flamingo_jax.data.tar import iter_members
from flamingo_jax.data.transforms import ProcessExample
from flamingo_jax.errors import DataError


def noisy_jpeg() -> bytes:
  buf = io.BytesIO()
  arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(arr).save(buf, format="JPEG")
  return buf.getvalue()


def run_epoch(data, name, small_tokenizer):
  """All batches of one epoch (batch size 1) and the final counters."""
  tok = Tokenizer.load(small_tokenizer)
  it = iter(make_dataset(name, data.datasets[name], data, tok))
  batches = list(it)
  for b in batches:
    n = (b["tokens"] == tok.info.image_token_id).sum(axis=1)
    assert n.tolist() == b["image_count"].tolist()
  return batches, it.stats()


def epoch_cfg(kind, paths, small_tokenizer, **ds):
  return make_data({"d": {"kind": kind, "paths": paths, "batch_size": 1, **ds}}, small_tokenizer,
                   train=False, num_epochs=1, max_skip_rate=0.9)


def test_bad_pairs_each_counted(tmp_path, small_tokenizer, caplog):
  jpg = noisy_jpeg()
  members = [m for i in range(5) for m in pair_members(i)]
  members += [
      ("000010.jpg", b"garbage, not a jpeg"), ("000010.txt", "sample number 10"),
      ("000011.jpg", jpg[:len(jpg) * 2 // 3]), ("000011.txt", "sample number 11"),
      ("000012.jpg", image_bytes()),  # no caption
      ("000013.txt", "no image"),
      ("000014.jpg", image_bytes()), ("000014.txt", "   "),
      ("000015.jpg", image_bytes()), ("000015.txt", "word " * 40),
      ("000016.jpg", image_bytes()), ("000016.json", "{not json"),
      ("000017.jpg", image_bytes()), ("000017.txt", "sample number one two three four five"),
  ]
  path = write_tar(tmp_path / "p.tar", members)
  with caplog.at_level(logging.WARNING):
    batches, stats = run_epoch(epoch_cfg("pairs", [path], small_tokenizer, max_text_chars=100,
                                         seq_len=6), "d", small_tokenizer)
  assert len(batches) == 6
  assert stats == {"examples_seen": 13, "examples_kept": 6, "skipped/corrupt_image": 2,
                   "skipped/missing_field": 2, "skipped/empty_text": 1,
                   "skipped/text_too_long": 1, "skipped/malformed_json": 1,
                   "truncated_text": 1}
  assert "first 'corrupt_image' skip" in caplog.text
  # With overlong_text='skip', captions over seq_len are skipped too.
  _, stats = run_epoch(epoch_cfg("pairs", [path], small_tokenizer, max_text_chars=100, seq_len=6,
                                 overlong_text="skip"), "d", small_tokenizer)
  assert stats["skipped/text_too_long"] == 2 and stats["examples_kept"] == 5


def test_bad_documents_each_counted(tmp_path, small_tokenizer):
  good = base64.b64encode(image_bytes()).decode()
  bad = base64.b64encode(b"valid base64, not an image").decode()
  docs = {
      "ok": {"texts": ["a red circle", None, "a blue square", None],
             "images": [None, good, None, good]},
      "no_image": {"texts": ["just text"], "images": [None]},
      "all_corrupt": {"texts": [None, "text", None], "images": [bad, None, bad]},
      "one_corrupt": {"texts": [None, "text", None, "more"], "images": [bad, None, good, None]},
      "not_downloaded": {"texts": [None, "text", None], "images": ["http://x/y.jpg", None, good]},
      "too_long": {"texts": ["word " * 50, None], "images": [None, good]},
      "mismatched": {"texts": ["a", "b"], "images": [None]},
      "bad_b64": {"texts": ["text", None], "images": [None, "not*base64"]},
      "absent_member": {"texts": ["text", None], "images": [None, "absent.jpg"]},
      "no_images_field": {"texts": ["text"]},
      "neither_layout": {"caption": "a red circle"},
  }
  members = [(f"{k}.json", json.dumps(d)) for k, d in docs.items()]
  members.append(("broken.json", "{"))
  path = write_tar(tmp_path / "d.tar", members)
  batches, stats = run_epoch(epoch_cfg("interleaved", [path], small_tokenizer, max_images=5,
                                       seq_len=64, max_text_chars=200), "d", small_tokenizer)
  assert len(batches) == 3
  assert stats == {"examples_seen": 12, "examples_kept": 3, "skipped/no_image": 1,
                   "skipped/corrupt_image": 1, "skipped/text_too_long": 1,
                   "skipped/malformed_json": 2, "skipped/bad_base64": 1,
                   "skipped/image_not_found": 1, "skipped/missing_field": 2,
                   "dropped_image/corrupt_image": 1, "dropped_image/image_not_found": 1}
  assert sorted(b["image_count"][0] for b in batches) == [1, 1, 2]


def test_bad_mmc4_documents_keep_the_root_cause(tmp_path, small_tokenizer, caplog):
  good = base64.b64encode(image_bytes()).decode()

  def info(i, sim=0.3, **image):
    return {"matched_text_index": i, "matched_sim": sim, **(image or {"image_base64": good})}

  texts = ["a red circle", "a blue square"]
  docs = {
      "ok": {"text_list": texts, "image_info": [info(1)]},
      "one_bad_index": {"text_list": texts, "image_info": [info(1), info(-1)]},
      "bad_index": {"text_list": texts, "image_info": [info(5)]},
      "low_sim": {"text_list": texts, "image_info": [info(0, sim=0.1)]},
      "bad_b64": {"text_list": texts, "image_info": [info(0, image_base64="@@@@")]},
      "absent_member": {"text_list": texts, "image_info": [info(0, image_name="x.jpg")]},
      "member": {"text_list": texts, "image_info": [info(0, image_name="img.jpg")]},
      "no_text_list": {"image_info": [info(0)]},
      "text_list_not_list": {"text_list": "a red circle", "image_info": []},
      "no_image_info": {"text_list": texts},
      "mixed": {"text_list": texts, "image_info": [info(7), info(8), info(0, sim=0.0)]},
  }
  members = [(f"{k}.json", json.dumps(d)) for k, d in docs.items()]
  members.append(("img.jpg", image_bytes()))
  path = write_tar(tmp_path / "m.tar", members)
  with caplog.at_level(logging.WARNING):
    batches, stats = run_epoch(epoch_cfg("interleaved", [path], small_tokenizer, max_images=2,
                                         seq_len=32), "d", small_tokenizer)
  assert len(batches) == 3
  assert stats == {"examples_seen": 11, "examples_kept": 3, "skipped/bad_text_index": 2,
                   "skipped/low_similarity": 1, "skipped/bad_base64": 1,
                   "skipped/image_not_found": 1, "skipped/missing_field": 1,
                   "skipped/malformed_json": 1, "skipped/no_image": 1,
                   "dropped_image/bad_text_index": 1}
  # The first skip of each reason is logged with what exactly was wrong.
  assert "m.tar/bad_index: images: bad_text_index=1; matched_text_index 5 is not in [0, 2)" \
      in caplog.text
  assert "MMC4 document without 'text_list'" in caplog.text
  # Converting to ArrayRecord counts the same causes.
  from flamingo_jax.data.convert import convert
  summary = convert("interleaved", [path], str(tmp_path / "ar"))
  assert summary["records"] == 3
  assert {k: v for k, v in summary["counts"].items() if k.startswith("skipped/")} == {
      k: v for k, v in stats.items() if k.startswith("skipped/")}


def test_counters_as_scalar_metrics():
  from flamingo_jax.data.accounting import scalar_metrics
  got = scalar_metrics({"m3w": {"examples_seen": 10, "examples_kept": 7,
                                "skipped/bad_base64": 2, "skipped/no_image": 1,
                                "dropped_image/low_similarity": 4},
                        "ltip": {"examples_seen": 0, "examples_kept": 0}})
  assert got == {"data/m3w/examples_seen": 10.0, "data/m3w/examples_kept": 7.0,
                 "data/m3w/skipped/bad_base64": 2.0, "data/m3w/skipped/no_image": 1.0,
                 "data/m3w/dropped_image/low_similarity": 4.0, "data/m3w/skip_rate": 0.3,
                 "data/ltip/examples_seen": 0.0, "data/ltip/examples_kept": 0.0,
                 "data/ltip/skip_rate": 0.0}


def test_bad_videos_each_counted(tmp_path, small_tokenizer, monkeypatch):
  frame = image_bytes(size=(8, 8))
  members = [("ok.json", json.dumps({"caption": "a red circle moves up", "fps": 1})),
             ("ok.0000.jpg", frame), ("ok.0001.jpg", frame),
             ("noframes.json", json.dumps({"caption": "nothing"})),
             ("badframe.txt", "a blue square moves left"), ("badframe.0000.jpg", b"junk"),
             ("badfile.txt", "a clip"), ("badfile.mp4", b"not a video"),
             ("badfps.json", json.dumps({"caption": "x", "fps": -1})), ("badfps.0.jpg", frame)]
  path = write_tar(tmp_path / "v.tar", members)
  cfg = epoch_cfg("video", [path], small_tokenizer, num_frames=2)
  batches, stats = run_epoch(cfg, "d", small_tokenizer)
  assert len(batches) == 1
  assert stats == {"examples_seen": 5, "examples_kept": 1, "skipped/missing_field": 1,
                   "skipped/corrupt_image": 1, "skipped/corrupt_video": 1,
                   "skipped/malformed_json": 1}
  # Without PyAV a video file is skipped as such, not a crash.
  monkeypatch.setitem(sys.modules, "av", None)
  proc = ProcessExample(cfg.datasets["d"], cfg.image, Tokenizer.load(small_tokenizer), train=False)
  out = proc.random_map({"key": "k", "video": b"x", "text": "a clip"}, np.random.default_rng(0))
  assert out == {"_skip": "video_decoder_unavailable", "key": "k"}


def test_unreadable_and_truncated_shards(tmp_path, small_tokenizer):
  good = write_tar(tmp_path / "a.tar", [m for i in range(4) for m in pair_members(i)])
  full = write_tar(tmp_path / "b.tar", [m for i in range(4, 8) for m in pair_members(i)])
  cut = list(iter_members(full))[5][1] + 10  # inside the data of sample 6's caption
  (tmp_path / "b.tar").write_bytes(open(full, "rb").read()[:cut])
  (tmp_path / "c.tar").write_bytes(b"this is not a tar file" * 50)
  batches, stats = run_epoch(epoch_cfg("pairs", [str(tmp_path / "*.tar")], small_tokenizer),
                             "d", small_tokenizer)
  assert stats["shards/unreadable"] == 1 and stats["shards/truncated"] == 1
  # The truncated shard keeps the samples before the break; the one it cut
  # through lost its caption.
  assert len(batches) == 6 and stats["skipped/missing_field"] == 1
  # Too many bad shards is an error, not a quiet run on a fraction of the data.
  data = make_data({"d": {"kind": "pairs", "paths": [str(tmp_path / "*.tar")]}}, small_tokenizer,
                   max_skip_rate=0.3)
  with pytest.raises(SkipRateError, match="1 of 3 shards are unreadable"):
    make_mixture(data)
  with pytest.raises(ValueError, match="no samples in the tar shards"):
    make_mixture(make_data({"d": {"kind": "pairs", "paths": [str(tmp_path / "c.tar")]}},
                           small_tokenizer))
  with pytest.raises(DataError, match=r"^data.datasets.d \(tar source\): no tar shards match"):
    make_mixture(make_data({"d": {"kind": "pairs", "paths": [str(tmp_path / "z*.tar")]}},
                           small_tokenizer))
  assert good


def test_bad_arrayrecord_files_and_records(tmp_path, small_tokenizer):
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(tmp_path / "a.array_record"), "group_size:1")
  for i in range(3):
    w.write(encode_record({"key": str(i), "image": image_bytes(), "text": f"sample {i}"},
                          "pairs"))
  w.write(b"\xc1 not msgpack")
  w.close()
  (tmp_path / "b.array_record").write_bytes(b"garbage" * 100)
  batches, stats = run_epoch(epoch_cfg("pairs", [str(tmp_path / "*.array_record")], small_tokenizer,
                                       source="arrayrecord"), "d", small_tokenizer)
  assert len(batches) == 3
  assert stats["shards/unreadable"] == 1 and stats["skipped/unreadable_record"] == 1
  with pytest.raises(ValueError, match="no readable, non-empty ArrayRecord"):
    run_epoch(epoch_cfg("pairs", [str(tmp_path / "b.array_record")], small_tokenizer,
                        source="arrayrecord"), "d", small_tokenizer)


def test_all_masked_and_unexpected_errors_are_skips(tmp_path, small_tokenizer, monkeypatch):
  doc = json.dumps({"texts": ["text", None], "images": [None, base64.b64encode(
      image_bytes()).decode()]})
  path = write_tar(tmp_path / "d.tar", [("a.json", doc), ("b.json", doc)])
  real = layouts.interleaved

  def all_masked(*args, **kwargs):
    lay = real(*args, **kwargs)
    lay.loss_mask[:] = 0
    return lay

  monkeypatch.setattr(layouts, "interleaved", all_masked)
  _, stats = run_epoch(epoch_cfg("interleaved", [path], small_tokenizer, max_images=2), "d",
                       small_tokenizer)
  assert stats["skipped/all_labels_masked"] == 2
  monkeypatch.setattr(layouts, "interleaved", lambda *a, **k: 1 / 0)
  _, stats = run_epoch(epoch_cfg("interleaved", [path], small_tokenizer, max_images=2), "d",
                       small_tokenizer)
  assert stats["skipped/processing_error"] == 2


def test_skip_rate_threshold_names_the_reasons(tmp_path, small_tokenizer):
  members = [m for i in range(6) for m in pair_members(i)]
  members += [(f"{i:06d}.jpg", b"junk") for i in range(10, 16)]
  members += [(f"{i:06d}.txt", "x") for i in range(10, 16)]
  members += [("000020.txt", "no image")]
  path = write_tar(tmp_path / "p.tar", members)
  data = make_data({"d": {"kind": "pairs", "paths": [path], "batch_size": 2}}, small_tokenizer,
                   max_skip_rate=0.2, skip_check_after=8)
  with pytest.raises(SkipRateError) as e:
    mixture = make_mixture(data)
    for _ in range(10):
      next(mixture)
  msg = str(e.value)
  assert "dataset 'd'" in msg and "max_skip_rate=0.2" in msg
  assert "corrupt_image=" in msg and "failed to decode" in msg
  # Below the threshold the same data trains on, with the skips counted.
  data = make_data({"d": {"kind": "pairs", "paths": [path], "batch_size": 2}}, small_tokenizer,
                   max_skip_rate=0.6, skip_check_after=8)
  mixture = make_mixture(data)
  for _ in range(10):
    next(mixture)
  stats = mixture.stats()["d"]
  assert stats["examples_kept"] == 20
  assert stats["skipped/corrupt_image"] + stats["skipped/missing_field"] == \
      stats["examples_seen"] - 20


def _tensorboard_scalars(directory) -> dict[str, float]:
  """{tag: value} of the scalar summaries in tensorboardX event files (TFRecords)."""
  import glob
  import struct

  from tensorboardX.proto import event_pb2
  out = {}
  for path in glob.glob(f"{directory}/events.out.tfevents*"):
    with open(path, "rb") as f:
      while header := f.read(12):  # uint64 length, uint32 crc
        data = f.read(struct.unpack("<Q", header[:8])[0])
        f.read(4)
        event = event_pb2.Event.FromString(data)
        for v in event.summary.value:
          out[v.tag] = v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]
  return out


def test_counters_reach_metrics_jsonl_and_tensorboard(tmp_path, small_tokenizer):
  """The trainer's step handler logs each dataset's counters with the step's metrics."""
  from flamingo_jax.training.loop import StepHandler, pipeline_stats
  from flamingo_jax.training.metrics import MetricsWriter
  members = [m for i in range(6) for m in pair_members(i)]
  members += [("000010.jpg", b"junk"), ("000010.txt", "a corrupt image")]
  path = write_tar(tmp_path / "p.tar", members)
  data = make_data({"pairs": {"kind": "pairs", "paths": [path], "batch_size": 2}}, small_tokenizer,
                   train=False, num_epochs=1, max_skip_rate=0.5)
  mixture = make_mixture(data)
  batches = list(mixture)
  assert len(batches) == 3
  writer = MetricsWriter(str(tmp_path / "run"))
  handler = StepHandler(total_steps=1, log_every=1, max_consecutive_nonfinite=3, writer=writer,
                        start_step=0, data_stats=lambda: pipeline_stats(mixture.iterators))
  handler(1, {"loss": 2.5, "update_skipped": 0.0, "nonfinite_consecutive": 0.0,
              "nonfinite_total": 0.0})
  writer.close()
  expected = {"data/pairs/examples_seen": 7.0, "data/pairs/examples_kept": 6.0,
              "data/pairs/skipped/corrupt_image": 1.0, "data/pairs/skip_rate": 1 / 7}
  row = json.loads(open(tmp_path / "run" / "metrics.jsonl").read().splitlines()[-1])
  assert row["step"] == 1 and row["loss"] == 2.5
  assert {k: row[k] for k in expected} == pytest.approx(expected)
  scalars = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
  assert {k: scalars[k] for k in expected} == pytest.approx(expected)
