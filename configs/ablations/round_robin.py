"""Paper Table 3, "Optimisation": Accumulation -> Round robin.

  python -m flamingo_jax.ablations --workdir demo_workdir --only round_robin
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "3"
GROUP = "Optimisation"
CHANGE = "Accumulation -> Round robin"


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["train.mixing='round_robin'"])
