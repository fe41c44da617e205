"""Paper Table 10, "Image-text association (M3W)": p_next 0.5 -> 1 (always the next image).

  python -m flamingo_jax.ablations --workdir demo_workdir --only p_next_1
"""
from flamingo_jax.ablations import PAPER_BASELINE, demo_base

TABLE = "10"
GROUP = "Image-text association (M3W)"
CHANGE = "p_next 0.5 -> 1 (always the next image)"
PAPER_OVERALL = 70.4 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["data.datasets.interleaved.p_next=1.0"])
