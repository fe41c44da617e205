"""Paper Table 3, "Optimisation": Accumulation -> Round robin.

  python -m flamingo_jax.ablations --workdir demo_workdir --only round_robin
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "3"
GROUP = "Optimisation"
CHANGE = "Accumulation -> Round robin"
PAPER_OVERALL = 62.9 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["train.mixing='round_robin'"])
