"""Paper Table 3, "Training data": All data -> w/o M3W (interleaved documents).

  python -m flamingo_jax.ablations --workdir demo_workdir --only no_interleaved
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base, remove_datasets

TABLE = "3"
GROUP = "Training data"
CHANGE = "All data -> w/o M3W (interleaved documents)"
PAPER_OVERALL = 53.4 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return remove_datasets(demo_base(workdir), "interleaved")
