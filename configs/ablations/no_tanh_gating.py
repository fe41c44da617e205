"""Paper Table 3, "Tanh gating": yes -> no.

  python -m flamingo_jax.ablations --workdir demo_workdir --only no_tanh_gating
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "3"
GROUP = "Tanh gating"
CHANGE = "yes -> no"
PAPER_OVERALL = 66.5 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.xattn.gating='none'"])
