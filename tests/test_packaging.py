"""An installed (non-editable) flamingo_jax runs the demo and the ablations: the wheel
ships configs/ as flamingo_jax/configs, found by config.configs_dir()."""
import os
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import glob, os, sys
import flamingo_jax
from flamingo_jax.apps import ablations
from flamingo_jax.apps.demo import stages as demo
from flamingo_jax.config import configs_dir, load_config
site = sys.argv[1]
assert flamingo_jax.__file__.startswith(site), flamingo_jax.__file__
assert configs_dir() == os.path.join(site, "flamingo_jax", "configs"), configs_dir()
workdir = os.path.abspath("work")
paths = ablations.ablation_paths()
assert len(paths) >= 18 and all(p.startswith(site) for p in paths), paths
base = demo.demo_config(workdir).to_dict()
for path in paths:
  assert load_config(path + ":" + workdir).to_dict() != base, path
from flamingo_jax.evaluate.protocol import IMAGENET_CLASSNAMES
assert IMAGENET_CLASSNAMES.startswith(site) and os.path.getsize(IMAGENET_CLASSNAMES) > 5000
print("loaded", len(paths), "ablations and the demo config from", configs_dir())
"""


def test_wheel_runs_the_demo_and_ablation_configs_from_elsewhere(tmp_path):
  src = tmp_path / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  shutil.copytree(os.path.join(REPO, "flamingo_jax"), src / "flamingo_jax", ignore=ignore)
  shutil.copytree(os.path.join(REPO, "configs"), src / "configs", ignore=ignore)
  shutil.copy(os.path.join(REPO, "setup.py"), src / "setup.py")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True,
                 timeout=300)
  (wheel,) = (tmp_path / "dist").glob("flamingo_jax-*.whl")
  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(site))
  out = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "loaded" in out.stdout
  help_out = subprocess.run([sys.executable, "-m", "flamingo_jax.ablations", "--help"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert help_out.returncode == 0 and "--only" in help_out.stdout, help_out.stderr[-2000:]
