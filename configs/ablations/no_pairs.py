"""Paper Table 3, "Training data": All data -> w/o image-text pairs.

  python -m flamingo_jax.ablations --workdir demo_workdir --only no_pairs
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base, remove_datasets

TABLE = "3"
GROUP = "Training data"
CHANGE = "All data -> w/o image-text pairs"
PAPER_OVERALL = 60.9 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return remove_datasets(demo_base(workdir), "pairs", "vqa")
