"""Paper Table 3, "Training data": All data -> w/o video-text pairs.

  python -m flamingo_jax.ablations --workdir demo_workdir --only no_video
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "3"
GROUP = "Training data"
CHANGE = "All data -> w/o video-text pairs"


def get_config(workdir="demo_workdir"):
  return remove_datasets(demo_base(workdir), "video")
