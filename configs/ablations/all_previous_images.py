"""Paper Table 10, "Attention to images": Last preceding image -> All previous images.

  python -m flamingo_jax.ablations --workdir demo_workdir --only all_previous_images
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "10"
GROUP = "Attention to images"
CHANGE = "Last preceding image -> All previous images"
PAPER_OVERALL = 63.5 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.xattn.attend_previous='all'"])
