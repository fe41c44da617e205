"""Paper Table 3, "Cross-attention frequency": Every -> Every 4th (the 3-layer LM: block 0 only).

  python -m flamingo_jax.ablations --workdir demo_workdir --only xattn_every_4
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "3"
GROUP = "Cross-attention frequency"
CHANGE = "Every -> Every 4th (the 3-layer LM: block 0 only)"
PAPER_OVERALL = 68.8 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.xattn.every=4"])
