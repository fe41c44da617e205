"""Paper Table 3, "Tanh gating": yes -> no.

  python -m flamingo_jax.ablations --workdir demo_workdir --only no_tanh_gating
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "3"
GROUP = "Tanh gating"
CHANGE = "yes -> no"


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.xattn.gating='none'"])
