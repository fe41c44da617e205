"""Paper Table 3, "Cross-attention frequency": Every -> Single in middle.

  python -m flamingo_jax.ablations --workdir demo_workdir --only xattn_middle
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "3"
GROUP = "Cross-attention frequency"
CHANGE = "Every -> Single in middle"


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.xattn.placement='middle'"])
