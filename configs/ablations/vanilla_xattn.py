"""Paper Table 3, "Cross-attention architecture": GATED XATTN-DENSE -> VANILLA XATTN.

  python -m flamingo_jax.ablations --workdir demo_workdir --only vanilla_xattn
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "3"
GROUP = "Cross-attention architecture"
CHANGE = "GATED XATTN-DENSE -> VANILLA XATTN"
PAPER_OVERALL = 66.9 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.xattn.kind='vanilla'"])
