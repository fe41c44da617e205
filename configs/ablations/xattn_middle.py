"""Paper Table 3, "Cross-attention frequency": Every -> Single in middle.

  python -m flamingo_jax.ablations --workdir demo_workdir --only xattn_middle
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "3"
GROUP = "Cross-attention frequency"
CHANGE = "Every -> Single in middle"
PAPER_OVERALL = 59.8 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.xattn.placement='middle'"])
