"""Sources: WebDataset tars (pairs, MMC4/OBELICS documents, videos), ArrayRecord, TFDS."""
import base64
import io
import json
import tarfile

import numpy as np
import pytest

from data_helpers import assert_batches_equal, image_bytes, make_data, pair_members, write_tar
from flamingo_jax.data import Tokenizer, convert, images, make_dataset, video
from flamingo_jax.data.records import decode_record, encode_record, skip_reason
from flamingo_jax.data.sources import ArrayRecordSource, TfdsSource
from flamingo_jax.data.tar import TarSource, index_shard, iter_members


def test_header_index_matches_tarfile_including_long_names(tmp_path):
  long = "d/" + "x" * 150 + ".jpg"
  for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
    path = str(tmp_path / f"{fmt}.tar")
    with tarfile.open(path, "w", format=fmt) as tf:
      for name, data in [("a/000.jpg", b"12345"), (long if fmt != tarfile.USTAR_FORMAT
                                                  else "b/000.txt", b"x" * 700)]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
      tf.addfile(tarfile.TarInfo("a/dir"))  # a zero-size member is still a file
    with tarfile.open(path) as tf:
      expect = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    assert list(iter_members(path)) == expect


def test_pairs_img2dataset_layout(tmp_path):
  write_tar(tmp_path / "s.tar", [
      *pair_members(0, "first"),
      ("000001.png", image_bytes(fmt="PNG")),
      ("000001.json", json.dumps({"caption": "from json", "label": 3})),
      ("_stats.json", "{}"),
  ])
  src = TarSource("pairs", [str(tmp_path / "s.tar")])
  assert len(src) == 2
  assert src[0]["text"] == "first" and src[0]["key"] == "s.tar/000000"
  assert src[1]["text"] == "from json" and src[1]["label"] == 3
  assert images.decode(src[1]["image"]).shape == (16, 24, 3)


def _doc_members():
  b64 = base64.b64encode(image_bytes((0, 0, 255))).decode()
  obelics = {"texts": ["intro", None, "after", None],
             "images": [None, "000000.a.png", None, "data:image/png;base64," + b64]}
  mmc4 = {"text_list": ["s0", "s1", "s2"],
          "image_info": [
              {"image_name": "pic.jpg", "matched_text_index": 1, "matched_sim": 0.3},
              {"image_base64": b64, "matched_text_index": 0, "matched_sim": 0.5},
              {"image_base64": b64, "matched_text_index": 2, "matched_sim": 0.1},
              {"raw_url": "http://x", "image_name": "http://x/y.jpg",
               "matched_text_index": 2, "matched_sim": 0.9}]}
  return [("000000.json", json.dumps(obelics)), ("000000.a.png", image_bytes(fmt="PNG")),
          ("000001.json", json.dumps(mmc4)), ("pic.jpg", image_bytes((0, 255, 0)))]


def test_interleaved_obelics_and_mmc4(tmp_path):
  write_tar(tmp_path / "d.tar", _doc_members())
  src = TarSource("interleaved", [str(tmp_path / "d.tar")])
  assert len(src) == 2  # the image members are not documents
  ob = src[0]
  assert ob["texts"] == ["intro", None, "after", None]
  assert [im is not None for im in ob["images"]] == [False, True, False, True]
  np.testing.assert_allclose(images.decode(ob["images"][3])[0, 0], [0, 0, 255], atol=3)
  mm = src[1]
  # MMC4 images go before their matched sentence; one is under the 0.24
  # similarity threshold and one was never downloaded.
  assert mm["texts"] == [None, "s0", None, "s1", "s2"]
  np.testing.assert_allclose(images.decode(mm["images"][0])[0, 0], [0, 0, 255], atol=3)
  assert images.decode(mm["images"][2])[0, 0, 1] > 200
  assert mm["_stats"] == {"dropped_image/low_similarity": 1,
                          "dropped_image/image_not_found": 1}
  src = TarSource("interleaved", [str(tmp_path / "d.tar")], min_similarity=0.0)
  assert src[1]["_stats"] == {"dropped_image/image_not_found": 1}


def test_video_frame_lists_sampled_at_1_fps(tmp_path, small_tokenizer):
  colours = [(i * 20, 0, 0) for i in range(10)]  # 10 frames at 2 FPS = 5 s
  members = [("000000.json", json.dumps({"caption": "a red circle moves up", "fps": 2}))]
  members += [(f"000000.{t:04d}.png", image_bytes(c, (8, 8), "PNG"))
              for t, c in enumerate(colours)]
  write_tar(tmp_path / "v.tar", members)
  rec = TarSource("video", [str(tmp_path / "v.tar")])[0]
  assert rec["fps"] == 2.0 and len(rec["frames"]) == 10
  assert video.frame_indices(10, 2.0, 1.0, 4) == [0, 2, 4, 6]
  assert video.frame_indices(10, 2.0, 1.0, 8) == [0, 2, 4, 6, 8, 9, 9, 9]  # last repeats
  assert video.frame_indices(30, 30.0, 1.0, 3, start=0.5) == [15, 29, 29]
  data = make_data({"v": {"kind": "video", "paths": [str(tmp_path / "v.tar")],
                          "num_frames": 4, "batch_size": 1}}, small_tokenizer, train=False,
                   image={"size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]})
  batch = next(iter(make_dataset("v", data.datasets["v"], data, Tokenizer.load(small_tokenizer))))
  assert batch["images"].shape == (1, 1, 4, 8, 8, 3)
  red = batch["images"][0, 0, :, 4, 4, 0]
  np.testing.assert_allclose(red, [0, 40, 80, 120], atol=3)


def _mp4(path, colours, fps):
  av = pytest.importorskip("av")
  with av.open(path, "w") as c:
    s = c.add_stream("mpeg4", rate=fps)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    for col in colours:
      frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), col, np.uint8), format="rgb24")
      for p in s.encode(frame):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def test_video_file_decoded_with_pyav(tmp_path):
  colours = [(i * 25, 0, 0) for i in range(10)]  # 10 frames at 5 FPS = 2 s
  _mp4(str(tmp_path / "v.mp4"), colours, 5)
  data = (tmp_path / "v.mp4").read_bytes()
  frames = video.decode_file(data, fps=1.0, num_frames=3, rng=None, train=False)
  assert len(frames) == 3 and frames[0].shape == (32, 32, 3)
  red = [int(f[16, 16, 0]) for f in frames]
  assert abs(red[0] - 0) < 12 and abs(red[1] - 125) < 12 and abs(red[2] - 225) < 12
  with pytest.raises(video.BadVideo):
    video.decode_file(b"not a video", 1.0, 3, None, False)
  write_tar(tmp_path / "v.tar", [("000000.mp4", data), ("000000.txt", "a clip")])
  rec = TarSource("video", [str(tmp_path / "v.tar")])[0]
  assert rec["video_format"] == "mp4" and rec["text"] == "a clip"


def test_converter_cli_writes_arrayrecord_equal_to_tar(tmp_path, small_tokenizer, capsys):
  shards = [write_tar(tmp_path / "in" / f"s{k}.tar",
                      [m for i in range(5 * k, 5 * k + 5) for m in pair_members(i)])
            for k in range(2)]
  convert.main(["--kind", "pairs", "--input", str(tmp_path / "in" / "*.tar"), "--out",
                str(tmp_path / "ar"), "--prefix", "train", "--records_per_file", "4"])
  summary = json.loads(capsys.readouterr().out)
  assert summary["records"] == 10 and len(summary["files"]) == 3
  assert summary["files"][0] == "train-00000-of-00003.array_record"
  ar = ArrayRecordSource("pairs", [str(tmp_path / "ar" / f) for f in summary["files"]])
  tar = TarSource("pairs", shards)
  assert len(ar) == len(tar) == 10
  assert ar[7]["text"] == tar[7]["text"] and ar[7]["image"] == tar[7]["image"]
  tok = Tokenizer.load(small_tokenizer)
  out = []
  converted = [str(tmp_path / "ar" / "*.array_record")]
  for source, paths in (("tar", shards), ("arrayrecord", converted)):
    data = make_data({"p": {"kind": "pairs", "source": source, "paths": paths,
                            "batch_size": 3}}, small_tokenizer, seed=4)
    it = iter(make_dataset("p", data.datasets["p"], data, tok))
    out.append([next(it) for _ in range(4)])
  assert_batches_equal(out[0], out[1])
  with pytest.raises(ValueError, match="holds 'pairs' records"):
    ArrayRecordSource("video", [str(tmp_path / "ar" / summary["files"][0])])


def test_records_are_msgpack_not_pickle():
  rec = {"key": "k", "texts": ["a", None], "images": [None, b"\x00\xff"]}
  back = decode_record(encode_record(rec, "interleaved"))
  assert back == {**rec, "kind": "interleaved"}
  with pytest.raises(Exception):
    decode_record(b"\xc1")


def test_tfds_data_source(tmp_path, small_tokenizer):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Image features need TensorFlow to *build* (not to read), so a uint8 tensor."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "pixels": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8,
                                         encoding="bytes"),
          "meta": {"caption": tfds.features.Text()}}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        yield i, {"pixels": np.full((10, 14, 3), 40 * i, np.uint8),
                  "meta": {"caption": f"sample number {i}"}}

  TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  fields = {"image": "pixels", "text": "meta/caption"}
  src = TfdsSource("pairs", "tiny_captions", "train", str(tmp_path), fields)
  assert len(src) == 6  # TFDS shuffles at preparation time
  assert sorted(src[i]["text"] for i in range(6)) == [f"sample number {i}" for i in range(6)]
  rec = src[0]
  assert rec["image"].shape == (10, 14, 3)
  assert rec["image"][0, 0, 0] == 40 * int(rec["text"].split()[-1])
  with pytest.raises(ValueError, match="has no feature 'caption'"):
    TfdsSource("pairs", "tiny_captions", "train", str(tmp_path), {"text": "caption"})
  data = make_data({"t": {"kind": "pairs", "source": "tfds", "tfds_name": "tiny_captions",
                          "tfds_data_dir": str(tmp_path), "tfds_fields": fields,
                          "batch_size": 6}}, small_tokenizer, train=False, num_epochs=1)
  tok = Tokenizer.load(small_tokenizer)
  batch = next(iter(make_dataset("t", data.datasets["t"], data, tok)))
  texts = sorted(tok.decode(t) for t in batch["tokens"])
  assert texts == sorted(f"<image>sample number {i}<EOC>" for i in range(6))


def test_skip_markers_pass_through_sources(tmp_path):
  write_tar(tmp_path / "s.tar", [("000000.txt", "no image")])
  assert skip_reason(TarSource("pairs", [str(tmp_path / "s.tar")])[0]) == "missing_field"
  assert index_shard(str(tmp_path / "s.tar")).error is None
