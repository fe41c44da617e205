"""Paper Table 3, "Resampler": Perceiver -> MLP.

  python -m flamingo_jax.ablations --workdir demo_workdir --only resampler_mlp
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "3"
GROUP = "Resampler"
CHANGE = "Perceiver -> MLP"


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.resampler.kind='mlp'"])
