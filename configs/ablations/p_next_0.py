"""Paper Table 10, "Image-text association (M3W)": p_next 0.5 -> 0 (always the previous image).

  python -m flamingo_jax.ablations --workdir demo_workdir --only p_next_0
"""
from flamingo_jax.ablations import PAPER_BASELINE, demo_base

TABLE = "10"
GROUP = "Image-text association (M3W)"
CHANGE = "p_next 0.5 -> 0 (always the previous image)"
PAPER_OVERALL = 69.6 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["data.datasets.interleaved.p_next=0.0"])
