"""Paper Table 3, "Cross-attention architecture": GATED XATTN-DENSE -> VANILLA XATTN.

  python -m flamingo_jax.ablations --workdir demo_workdir --only vanilla_xattn
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "3"
GROUP = "Cross-attention architecture"
CHANGE = "GATED XATTN-DENSE -> VANILLA XATTN"


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.xattn.kind='vanilla'"])
