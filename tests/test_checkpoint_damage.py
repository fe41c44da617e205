"""Random byte damage at random offsets in the newest checkpoint (state arrays, metadata,
data state) and in a parameter directory (a model directory's params, a frozen component):
every case is caught and falls back (or is refused) in one line, or leaves the restored
state bit-identical (bytes restore never reads, e.g. a commit marker's text); none
restores different values. A state with NaN is never saved; rotation keeps the newest
checkpoint that a finite step followed, and the restored one until it is confirmed; the
checksums do not depend on the sharding."""
import glob
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.errors import CheckpointError
from flamingo_jax.runtime import checksum, params_io
from flamingo_jax.training import checkpoint as ckpt_lib

SEEDS = range(20)


def _state(step):
  return {"params": {"w": jnp.arange(2000.0) * 0.5 + step, "b": jnp.ones(8, jnp.bfloat16) * step},
          "opt_state": {"mu": jnp.linspace(-1, 1, 300) * step, "count": jnp.int32(step)},
          "step": jnp.int32(step)}


TARGET = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(1))


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _damage(path, rng):
  """XORs 1-16 bytes at a random offset with non-zero random bytes (every byte changes)."""
  size = os.path.getsize(path)
  offset = int(rng.integers(0, size))
  n = min(int(rng.integers(1, 17)), size - offset)
  with open(path, "r+b") as f:
    f.seek(offset)
    old = np.frombuffer(f.read(n), np.uint8)
    f.seek(offset)
    f.write((old ^ rng.integers(1, 256, n, dtype=np.uint8)).tobytes())


def _files(root):
  return sorted(os.path.relpath(f, root) for f in glob.glob(f"{root}/**", recursive=True)
                if os.path.isfile(f))


def _groups(files):
  """The newest step's files by part: every part is damaged once per seed."""
  groups = {"arrays": [], "state metadata": [], "data state": [], "step metadata": []}
  for f in files:
    if re.search(r"(^|/)d/", f):
      groups["arrays"].append(f)
    elif f.startswith("state/"):
      groups["state metadata"].append(f)
    elif f.startswith("data/"):
      groups["data state"].append(f)
    else:
      groups["step metadata"].append(f)
  return groups


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  root = tmp_path_factory.mktemp("pristine")
  c = ckpt_lib.Checkpointer(str(root), ckpt_lib.checkpoint_config({"keep": 3}))
  for step in (1, 2):
    c.save(step, _state(step), {"ds": {"next_index": 8 * step}})
  c.close()
  return root


def _restore_damaged(pristine, tmp_path, name, rng, on_corrupt="fallback"):
  work = tmp_path / "ckpt"
  shutil.rmtree(work, ignore_errors=True)
  shutil.copytree(pristine, work)
  _damage(work / "2" / name, rng)
  c = ckpt_lib.Checkpointer(str(work), ckpt_lib.checkpoint_config({"on_corrupt": on_corrupt}))
  try:
    return c.restore_latest(TARGET), c, work
  finally:
    c.close()


def test_random_damage_in_the_newest_checkpoint_is_caught(pristine, tmp_path, caplog):
  files = _files(pristine / "2")
  groups = _groups(files)
  assert all(groups.values()), groups
  big = max(groups["arrays"], key=lambda f: os.path.getsize(pristine / "2" / f))
  cases = [(0, f) for f in files]  # every file once; per seed the arrays' data and any file
  for seed in SEEDS:
    cases += [(seed, big), (seed, files[int(np.random.default_rng(seed).integers(len(files)))])]
  caught = {}
  for seed, name in cases:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flamingo_jax.training.checkpoint"):
      (step, state, data), c, work = _restore_damaged(
          pristine, tmp_path, name, np.random.default_rng([seed, files.index(name)]))
    if step == 1:  # caught: one line, set aside, the older step exactly
      (line,) = [r.getMessage() for r in caplog.records if "2.corrupt" in r.getMessage()]
      head = line.split("; set aside")[0]
      assert re.match(rf"checkpoint 2 at {re.escape(str(work))}/2: (array|file) \S+: .", head)
      assert len("error: " + head) < 200 and "{" not in head, line
      assert _equal(state, _state(1)) and data == {"ds": {"next_index": 8}}
      assert sorted(os.listdir(work)) == ["1", "2.corrupt"]
    else:  # bytes restore does not read: the state as written
      assert step == 2 and _equal(state, _state(2)) and data == {"ds": {"next_index": 16}}
    caught.setdefault(name, []).append(step == 1)
  # Always caught: the arrays' data (the largest file), the root index, the tree, the
  # checksums and the data state. (A process's own b-tree, superseded by the root one
  # that orbax merges, is never read: damage there restores the state as written.)
  # Always caught: the root index, the tree, the checksums and the data state; damage in
  # the arrays' data file is caught unless it lands in bytes restore never reads (a
  # process's own b-tree, superseded by the root one orbax merges: the state as written).
  for name, hits in caught.items():
    if re.search(r"^state/d/|METADATA$|^state/manifest|^data/process", name):
      assert all(hits), (name, hits)
  assert sum(caught[big]) > len(caught[big]) // 2 and len(caught[big]) > len(SEEDS)


def test_refuse_names_step_path_and_array(pristine, tmp_path):
  big = max(_groups(_files(pristine / "2"))["arrays"],
            key=lambda f: os.path.getsize(pristine / "2" / f))
  for seed in range(3):
    with pytest.raises(CheckpointError) as e:
      _restore_damaged(pristine, tmp_path, big, np.random.default_rng(seed), "refuse")
    msg = str(e.value)
    assert msg.startswith(f"checkpoint 2 at {tmp_path}/ckpt/2: ") and len(msg) < 193, msg
    assert msg.endswith("(refused: checkpoint.on_corrupt='refuse')")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]  # nothing renamed


def test_random_damage_in_a_parameter_directory_is_caught(tmp_path):
  """save_params / restore_params: model directories, frozen components, model_init."""
  tree = {"lm": {"embed": np.arange(4000, dtype=np.float32).reshape(400, 10) / 7},
          "vision": {"conv": np.linspace(0, 1, 600, dtype=np.float32)}}
  pristine = tmp_path / "pristine"
  params_io.save_params(str(pristine), tree, {"component": "lm"})
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), tree)
  want = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), tree)
  got = params_io.restore_params(str(pristine), target)  # verified as float32, then cast
  assert _equal(got, want) and got["lm"]["embed"].dtype == jnp.bfloat16
  files = _files(pristine)
  data = [f for f in files if re.search(r"(^|/)d/", f)]
  big = max(data, key=lambda f: os.path.getsize(pristine / f))
  cases = [(0, f) for f in files] + [(seed, big) for seed in SEEDS]
  work, caught = tmp_path / "params", {}
  for seed, name in cases:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work)
    _damage(work / name, np.random.default_rng([seed, files.index(name)]))
    try:
      got = params_io.restore_params(str(work), target)
    except CheckpointError as e:
      msg = str(e)
      assert re.match(rf"checkpoint at {re.escape(str(work))}: (array|file) \S+: .", msg), msg
      assert len("error: " + msg) < 200 and "{" not in msg and "\n" not in msg, msg
      caught.setdefault(name, []).append(True)
      continue
    assert _equal(got, want), name  # bytes restore never reads
    caught.setdefault(name, []).append(False)
  for name, hits in caught.items():
    if re.search(r"^d/|METADATA$|^manifest", name):
      assert all(hits), (name, hits)
  assert sum(caught[big]) > len(caught[big]) // 2 and len(caught[big]) >= len(SEEDS)


def test_checksums_do_not_depend_on_the_sharding_and_see_one_bit():
  mesh = jax.make_mesh((min(4, jax.device_count()), 1), ("a", "b"))
  x = {"w": jnp.arange(64 * 48, dtype=jnp.float32).reshape(64, 48),
       "h": jnp.ones((16, 8), jnp.bfloat16), "i": jnp.arange(7, dtype=jnp.int32)}
  record, nonfinite = checksum.tree_record(x)
  assert nonfinite == []
  sharded = dict(x, w=jax.device_put(x["w"], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("a", None))))
  checksum.verify(record, sharded)
  host = jax.tree.map(np.asarray, x)  # an export's host arrays: summed on the host, equal
  assert checksum.tree_record(host)[0] == record
  for i in (0, 1000, 64 * 48 - 1):  # one flipped bit anywhere
    bits = np.asarray(x["w"]).view(np.uint32).copy().reshape(-1)
    bits[i] ^= 1 << (i % 32)
    with pytest.raises(checksum.CorruptError, match="array w: checksum mismatch"):
      checksum.verify(record, dict(x, w=jnp.asarray(bits.view(np.float32).reshape(64, 48))))
  swapped = np.asarray(x["w"]).copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # the same values at other positions
  with pytest.raises(checksum.CorruptError):
    checksum.verify(record, dict(x, w=jnp.asarray(swapped)))


def test_a_state_with_nan_or_inf_is_never_saved(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path), ckpt_lib.checkpoint_config({}))
  c.save(1, _state(1), {})
  bad = _state(2)
  bad["opt_state"]["mu"] = bad["opt_state"]["mu"].at[3].set(jnp.inf)
  with pytest.raises(ckpt_lib.NonFiniteStateError, match=r"step 2: the state holds NaN or inf "
                     r"in 1 arrays \(opt_state/mu\); it is not saved .*checkpoint 1"):
    c.save(2, bad, {})
  c.close()
  assert sorted(os.listdir(tmp_path)) == ["1"]


def test_rotation_keeps_the_newest_good_and_the_unconfirmed_restored_step(tmp_path):
  cfg = ckpt_lib.checkpoint_config({"keep": 2})
  c = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  c.save(1, _state(1), {})
  c.mark_good(1)  # step 2 was finite
  c.save(2, _state(2), {})
  c.mark_good(2)
  for step in (3, 4, 5):  # the steps after 3 and 4 were not finite: unconfirmed
    c.save(step, _state(step), {})
  c.close()
  assert c.all_steps() == [2, 4, 5] and (tmp_path / "2" / ckpt_lib.FINITE_NEXT).exists()
  # A restored step is kept until a finite step follows it (its old mark is dropped).
  c = ckpt_lib.Checkpointer(str(tmp_path), cfg)
  for step in (5, 4):
    shutil.rmtree(tmp_path / str(step))
  c.manager.reload()
  assert c.restore_latest(TARGET)[0] == 2 and c.restored_step == 2
  assert not (tmp_path / "2" / ckpt_lib.FINITE_NEXT).exists()
  for step in (4, 6, 8):
    c.save(step, _state(step), {})
  assert c.all_steps() == [2, 6, 8]
  c.mark_good(8)
  c.save(10, _state(10), {})
  c.close()
  assert c.all_steps() == [8, 10]


def test_checkpoints_without_checksums_restore_with_one_warning(tmp_path, caplog):
  """Written before checksums existed: no record in the custom metadata, no digests."""
  c = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), ckpt_lib.checkpoint_config({}))
  c.save(3, _state(3), {"ds": {"next_index": 24}})
  c.close()
  meta = tmp_path / "ckpt" / "3" / "_CHECKPOINT_METADATA"
  meta.write_text(json.dumps(dict(json.loads(meta.read_text()), custom_metadata={})))
  for f in glob.glob(f"{tmp_path}/ckpt/3/data/*.sha256"):
    os.remove(f)
  params_io.save_params(str(tmp_path / "params"), {"w": np.ones(5, np.float32)})
  meta = tmp_path / "params" / "_CHECKPOINT_METADATA"
  meta.write_text(json.dumps(dict(json.loads(meta.read_text()), custom_metadata={})))
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      c = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), ckpt_lib.checkpoint_config({}))
      step, state, data = c.restore_latest(TARGET)
      c.close()
      assert step == 3 and _equal(state, _state(3)) and data == {"ds": {"next_index": 24}}
      got = params_io.restore_params(str(tmp_path / "params"),
                                     {"w": jax.ShapeDtypeStruct((5,), jnp.float32)})
      assert _equal(got, {"w": np.ones(5)})
  lines = [r.getMessage() for r in caplog.records if "has no checksums" in r.getMessage()]
  assert lines == [f"{tmp_path}/ckpt/3 has no checksums (written before they existed): "
                   "restored unverified", f"{tmp_path}/params has no checksums (written before "
                   "they existed): restored unverified"]
