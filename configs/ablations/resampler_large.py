"""Paper Table 10, "Resampler size": Medium (depth 2, d 128) -> Large (depth 4, d 256).

  python -m flamingo_jax.ablations --workdir demo_workdir --only resampler_large
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "10"
GROUP = "Resampler size"
CHANGE = "Medium (depth 2, d 128) -> Large (depth 4, d 256)"
PAPER_OVERALL = 69.0 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.resampler.depth=4", "model.resampler.width=256",
                             "model.resampler.head_dim=64"])
