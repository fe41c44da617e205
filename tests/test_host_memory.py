"""flamingo_jax/host_memory.py: XLA's large CPU temporaries stop page-faulting every step.

Each case runs in a fresh interpreter: the glibc settings only take effect before
JAX's backend (its threads) starts, which in the pytest process it already has.
"""
import json
import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

# A jitted step whose XLA buffers are blocks above glibc's 32 MB mmap ceiling: the page
# faults of its second and third calls, after the first compiled and ran it.
STEP_FAULTS = """
import json, resource, sys
from flamingo_jax import errors
from flamingo_jax.process import host_memory
applied = None
if sys.argv[1] == "apply":
  applied = host_memory.keep_freed_memory()
elif sys.argv[1] == "program":  # a command line's `sys.exit(run_cli(main))`
  sys.argv = sys.argv[:1]
  errors.run_cli(lambda argv: 0)
elif sys.argv[1] == "in_process":  # a test calling run_cli(main, argv)
  errors.run_cli(lambda argv: 0, [])
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x)[:, None] * jnp.cos(x)[None, :]).sum(0))  # [8192, 8192] f32
x = jnp.ones(8192, jnp.float32)
f(x).block_until_ready()
faults = []
for _ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def run_python(code: str, *args: str, **env: str) -> dict:
  out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_step_temporary_stays_mapped():
  kept, program, in_process, default = (run_python(STEP_FAULTS, how) for how in
                                        ("apply", "program", "in_process", "leave"))
  assert kept["applied"] is True
  # glibc's default unmaps the blocks on free: every call faults them back in (more than
  # 32 MB of 4 KB pages). run_cli with argv (in-process callers such as tests) leaves the
  # process alone.
  refaulted = min(default["faults"] + in_process["faults"])
  assert refaulted > (32 << 20) // 4096, (default, in_process)
  # Kept: the blocks are reused from the heap; a program's run_cli() keeps them too.
  for r in (kept, program):
    assert max(r["faults"]) < refaulted // 20, r


WHEN = """
import json, sys
import jax
from flamingo_jax.process import host_memory
if sys.argv[1] == "started":
  jax.devices()
print(json.dumps({"applied": host_memory.keep_freed_memory()}))
"""


@pytest.mark.parametrize("case,env,applied", [
    ("fresh", {}, True),
    ("fresh", {"JAX_PLATFORMS": ""}, True),  # no platform named, no accelerator plugin
    ("fresh", {"FLAMINGO_JAX_KEEP_HOST_MEMORY": "0"}, False),  # opted out
    ("fresh", {"JAX_PLATFORMS": "cuda"}, False),  # an accelerator backend: left alone
    ("started", {}, False),  # too late: the backend's threads have their arenas
])
def test_when_it_applies(case, env, applied):
  assert run_python(WHEN, case, **env)["applied"] is applied


def test_an_installed_accelerator_plugin_leaves_it_alone(tmp_path):
  """JAX's CUDA and ROCm plugins install into the jax_plugins namespace package."""
  (tmp_path / "jax_plugins" / "xla_fake").mkdir(parents=True)
  (tmp_path / "jax_plugins" / "xla_fake" / "__init__.py").write_text("")
  env = {"JAX_PLATFORMS": "", "PYTHONPATH": str(tmp_path)}
  assert run_python(WHEN, "fresh", **env)["applied"] is False


def test_the_benchmark_wants_a_finished_demo_workdir(tmp_path, capsys):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "host_memory_benchmark", os.path.join(REPO, "benchmarks", "host_memory.py"))
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)
  assert benchmark.main(["--workdir", str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith(f"error: {tmp_path}/data is missing")
