"""Paper Table 10, "Attention to images": Last preceding image -> All previous images.

  python -m flamingo_jax.ablations --workdir demo_workdir --only all_previous_images
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "10"
GROUP = "Attention to images"
CHANGE = "Last preceding image -> All previous images"


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.xattn.attend_previous='all'"])
