"""Paper Table 3, "Resampler": Perceiver -> MLP.

  python -m flamingo_jax.ablations --workdir demo_workdir --only resampler_mlp
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "3"
GROUP = "Resampler"
CHANGE = "Perceiver -> MLP"
PAPER_OVERALL = 66.6 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.resampler.kind='mlp'"])
