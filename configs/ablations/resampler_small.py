"""Paper Table 10, "Resampler size": Medium (depth 2, d 128) -> Small (depth 1, d 64).

  python -m flamingo_jax.ablations --workdir demo_workdir --only resampler_small
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "10"
GROUP = "Resampler size"
CHANGE = "Medium (depth 2, d 128) -> Small (depth 1, d 64)"
PAPER_OVERALL = 67.9 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.resampler.depth=1", "model.resampler.width=64",
                             "model.resampler.head_dim=16"])
