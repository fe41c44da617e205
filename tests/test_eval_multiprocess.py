"""Multi-host evaluation for real: 2 processes on this CPU (jax.distributed, a localhost
coordinator, one CPU device each) split every batch of queries over a 2-way data mesh,
gather the results, and write the predictions and scores of a 1-process run."""
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from flamingo_jax.evaluate import cli
from eval_files import make_msrvtt_qa, make_vqa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = os.path.join(REPO, "configs", "eval")
CACHE = os.environ.get("FLAMINGO_JAX_TEST_CACHE", os.path.join(  # as test_multiprocess.py
    tempfile.gettempdir(), f"flamingo_jax_test_jit_cache_{os.getuid()}"))
TASKS = ("vqav2", "msrvtt_qa")  # still images and video clips
ARGS = ["--shots", "1", "--config.eval.decode_method=greedy", "--config.eval.batch_size=2",
        "--config.eval.prompt_buckets=(128,)", "--no_progress",
        "--config.eval.tasks.msrvtt_qa.num_frames=3", "--config.eval.tasks.msrvtt_qa.fps=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
  root = tmp_path_factory.mktemp("eval_mp")
  data = root / "data"
  make_vqa(str(data / "vqav2"), "v2_OpenEnded_mscoco_{}_questions.json",
           "v2_mscoco_{}_annotations.json")
  make_msrvtt_qa(str(data / "msrvtt_qa"))
  directory, _ = tiny_model_dir
  evals = [a for t in TASKS for a in ("--eval", f"{EVAL}/{t}.py:{data / t}")]
  return dict(model=directory, evals=evals)


def _predictions(out, task):
  return json.loads((out / "predictions" / f"{task}_1shot.json").read_text())


@pytest.mark.slow
def test_two_processes_give_the_one_process_results(world, tmp_path):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "flamingo_jax.evaluate", "--checkpoint", world["model"],
       *world["evals"], *ARGS, "--mesh.data=2", "--out", str(tmp_path / "multi"),
       f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=900)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert "| vqav2 | VQA acc. |" in outs[0] and "| vqav2 |" not in outs[1]  # process 0 reports
  assert "Mean of empty slice" not in outs[1]  # the others do not score, and say nothing
  multi = json.loads((tmp_path / "multi" / "results.json").read_text())
  assert (multi["processes"], multi["devices"]) == (2, 2)

  one = cli.main(["--checkpoint", world["model"], *world["evals"], *ARGS,
                  "--out", str(tmp_path / "one")])
  assert one["processes"] == 1
  for task in TASKS:
    a, b = _predictions(tmp_path / "multi", task), _predictions(tmp_path / "one", task)
    assert len(a) == 2 and a == b, task  # every field: ids, shots, references, predictions
    assert multi["results"][task]["shots"]["1"]["trials"] == \
        one["results"][task]["shots"]["1"]["trials"]
  # Each process encoded its half of every feature batch; the cache holds all of them.
  assert multi["features"]["computed"] == one["features"]["computed"] > 0
