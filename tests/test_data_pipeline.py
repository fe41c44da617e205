"""The grain pipeline and the mixture: contract, determinism, resume, sharding, workers."""
import json

import numpy as np
import pytest

from data_helpers import assert_batches_equal, make_data, pair_members, write_tar
from flamingo_jax.data import (Tokenizer, data_config, example_spec, iterator_states,
                               make_dataset, make_mixture, make_train_iterators,
                               restore_iterator_states)
from flamingo_jax.data.synthetic import dataset_configs


def world_data(shapes_world, source="arrayrecord", **overrides):
  root, _ = shapes_world
  ds = dataset_configs(root, source, "train")
  for name, bs in (("pairs", 4), ("vqa", 3), ("interleaved", 2), ("video", 2)):
    ds[name]["batch_size"] = bs
  ds["interleaved"]["seq_len"] = 48
  return make_data(ds, f"{root}/tokenizer/tokenizer.model", **overrides)


def test_batches_follow_the_contract(shapes_world):
  data = world_data(shapes_world, "tar")
  tok = Tokenizer.load(data.tokenizer)
  info = tok.info
  mixture = make_mixture(data)
  for _ in range(3):
    batches = next(mixture)
    assert set(batches) == {"pairs", "vqa", "interleaved", "video"}
    for name, b in batches.items():
      cfg = data.datasets[name]
      spec = example_spec(cfg, data.image)
      assert set(b) == set(spec)
      for k, (shape, dtype) in spec.items():
        assert b[k].shape == (cfg.batch_size, *shape), (name, k)
        assert b[k].dtype == dtype, (name, k)
      np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])
      assert (b["tokens"][:, 0] == info.bos_id).all()
      n_img = (b["tokens"] == info.image_token_id).sum(axis=1)
      np.testing.assert_array_equal(n_img, b["image_count"])
      assert not b["loss_mask"][b["targets"] == info.image_token_id].any()
      assert (b["loss_mask"].sum(axis=1) > 0).all()
      for row, count in enumerate(b["image_count"]):
        assert count >= 1
        assert not b["images"][row, count:].any()  # empty slots are zeros
        assert np.abs(b["images"][row, :count]).max() > 0.5
      if name != "interleaved":
        assert not b["next_image"].any()
  text = tok.decode(batches["video"]["tokens"][0])
  assert text.startswith("<image>") and " moves " in text and text.endswith("<EOC>")


def test_deterministic_given_the_seed(shapes_world):
  a = [next(m) for m in [make_mixture(world_data(shapes_world))] for _ in range(3)]
  b = [next(m) for m in [make_mixture(world_data(shapes_world))] for _ in range(3)]
  assert_batches_equal(a, b)
  c = next(make_mixture(world_data(shapes_world, seed=7)))
  assert not np.array_equal(c["pairs"]["tokens"], a[0]["pairs"]["tokens"])


def test_exact_resume_from_a_json_state(shapes_world):
  mixture = make_mixture(world_data(shapes_world))
  for _ in range(5):  # mid-epoch for every dataset (the documents wrap around)
    next(mixture)
  state = json.loads(json.dumps(iterator_states(mixture)))
  expected = [next(mixture) for _ in range(4)]
  expected_stats = mixture.stats()
  fresh = make_mixture(world_data(shapes_world))
  restore_iterator_states(fresh, state)
  assert_batches_equal([next(fresh) for _ in range(4)], expected)
  assert fresh.stats() == expected_stats
  with pytest.raises(ValueError, match="data state holds datasets"):
    restore_iterator_states(fresh, {"pairs": state["pairs"]})


def test_orbax_checkpoint_through_grain_handler(shapes_world, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  mixture = make_mixture(world_data(shapes_world))
  next(mixture)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(mixture)))
    mngr.wait_until_finished()
  expected = [next(mixture) for _ in range(2)]
  fresh = make_mixture(world_data(shapes_world))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal([next(fresh) for _ in range(2)], expected)


def test_two_shards_are_disjoint_and_cover(tmp_path, small_tokenizer):
  tok = Tokenizer.load(small_tokenizer)
  paths = [write_tar(tmp_path / f"s{k}.tar",
                     [m for i in range(7 * k, 7 * k + 7) for m in pair_members(i)])
           for k in range(2)]
  seen = []
  for shard in range(2):
    # batch_size is global: each of the 2 processes gets 1 row of every batch.
    data = make_data({"p": {"kind": "pairs", "paths": paths, "batch_size": 2}}, small_tokenizer,
                     shard_index=shard, shard_count=2, num_epochs=1, train=False)
    it = iter(make_dataset("p", data.datasets["p"], data, tok, shard, 2))
    seen.append([tok.decode(t) for b in it for t in b["tokens"]])
  assert set(seen[0]).isdisjoint(seen[1])
  assert set(seen[0]) | set(seen[1]) == {f"<image>sample number {i}<EOC>" for i in range(14)}
  assert len(seen[0]) == len(seen[1]) == 7
  # The trainer's view: the rows of the global batch this process holds.
  data = make_data({"p": {"kind": "pairs", "paths": paths, "batch_size": 4}}, small_tokenizer,
                   shard_index=-1, shard_count=-1, num_epochs=1, train=False)
  rows = [make_train_iterators(data, rows={"p": r}, tokenizer=tok)["p"]
          for r in ((0, 2), (2, 4))]
  got = [[tok.decode(t) for t in next(it)["tokens"]] for it in rows]
  assert got == [seen[0][:2], seen[1][:2]]
  with pytest.raises(ValueError, match="do not split the global batch"):
    make_train_iterators(data, rows={"p": (1, 4)}, tokenizer=tok)
  with pytest.raises(ValueError, match="must be divisible by the 2 shards"):
    make_dataset("p", data.datasets["p"].__class__(kind="pairs", paths=tuple(paths),
                                                    batch_size=3), data, tok, 0, 2)
  # The shard comes from JAX when not configured.
  from flamingo_jax.data import shard_info
  assert shard_info(data) == (0, 1)


def test_epochs_reshuffle_and_eval_mode_is_ordered(tmp_path, small_tokenizer):
  tok = Tokenizer.load(small_tokenizer)
  path = write_tar(tmp_path / "s.tar", [m for i in range(6) for m in pair_members(i)])
  data = make_data({"p": {"kind": "pairs", "paths": [path], "batch_size": 6,
                          "space_prob": 0.0}}, small_tokenizer, num_epochs=2)
  it = iter(make_dataset("p", data.datasets["p"], data, tok))
  e1, e2 = (sorted(tok.decode(t) for t in next(it)["tokens"]) for _ in range(2))
  assert e1 == e2  # every example once per epoch
  with pytest.raises(StopIteration):
    next(it)
  data = make_data({"p": {"kind": "pairs", "paths": [path], "batch_size": 4}}, small_tokenizer,
                   num_epochs=1, train=False)
  batches = list(make_dataset("p", data.datasets["p"], data, tok))
  assert [b["tokens"].shape[0] for b in batches] == [4, 2]  # eval keeps the remainder
  texts = [tok.decode(t) for b in batches for t in b["tokens"]]
  assert texts == [f"<image>sample number {i}<EOC>" for i in range(6)]


def test_worker_processes_give_the_same_batches(shapes_world):
  """Decoding in 2 grain worker processes changes nothing but speed."""
  root, _ = shapes_world
  ds = {"interleaved": dataset_configs(root, "arrayrecord", "train")["interleaved"]}
  ds["interleaved"].update(batch_size=3, seq_len=48)
  tok = f"{root}/tokenizer/tokenizer.model"
  serial = make_mixture(make_data(ds, tok))
  expected = [next(serial) for _ in range(4)]
  parallel = make_mixture(make_data(ds, tok, worker_count=2, worker_buffer_size=2))
  try:
    got = [next(parallel) for _ in range(2)]
    state = json.loads(json.dumps(iterator_states(parallel)))
    got += [next(parallel) for _ in range(2)]
    assert_batches_equal(got, expected)
    restore_iterator_states(serial, state)  # a state from workers resumes without them
    assert_batches_equal([next(serial) for _ in range(2)], expected[2:])
  finally:
    parallel.close()


def test_kind_defaults_are_the_papers():
  data = make_data({"m3w": {"kind": "interleaved", "paths": ["x"]},
                    "vtp": {"kind": "video", "paths": ["x"]},
                    "ltip": {"kind": "pairs", "paths": ["x"], "seq_len": 64}}, "")
  m3w, vtp, ltip = (data.datasets[k] for k in ("m3w", "vtp", "ltip"))
  assert (m3w.seq_len, m3w.max_images, m3w.num_frames, m3w.p_next) == (256, 5, 1, 0.5)
  assert (vtp.seq_len, vtp.max_images, vtp.num_frames, vtp.fps) == (32, 1, 8, 1.0)
  assert (ltip.seq_len, ltip.max_images, ltip.p_next) == (64, 1, 0.0)


def test_config_errors_name_the_key(shapes_world):
  tok = f"{shapes_world[0]}/tokenizer/tokenizer.model"
  with pytest.raises(ValueError, match="unknown config key 'data.datasets.p.batchsize'"):
    make_data({"p": {"kind": "pairs", "paths": ["x"], "batchsize": 2}}, tok)
  with pytest.raises(ValueError, match="'data.datasets.p.kind' is 'pair'"):
    make_data({"p": {"kind": "pair", "paths": ["x"]}}, tok)
  with pytest.raises(ValueError, match="'data.datasets.p.max_images' must be 1"):
    make_data({"p": {"kind": "pairs", "paths": ["x"], "max_images": 5}}, tok)
  with pytest.raises(ValueError, match="'data.datasets.p.paths' is empty"):
    make_data({"p": {"kind": "pairs"}}, tok)
  with pytest.raises(ValueError, match="'data.max_skip_rate' must be in"):
    make_data({"p": {"kind": "pairs", "paths": ["x"]}}, tok, max_skip_rate=1.0)
  with pytest.raises(ValueError, match="'data.shard_index' and 'data.shard_count'"):
    make_data({"p": {"kind": "pairs", "paths": ["x"]}}, tok, shard_index=0, shard_count=-1)
  with pytest.raises(ValueError, match="'data.datasets' is empty"):
    data_config({"datasets": {}})
  with pytest.raises(ValueError, match="'data.tokenizer' is empty"):
    make_mixture(make_data({"p": {"kind": "pairs", "paths": ["x"]}}, ""))
