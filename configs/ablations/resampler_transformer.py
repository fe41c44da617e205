"""Paper Table 3, "Resampler": Perceiver -> Transformer.

  python -m flamingo_jax.ablations --workdir demo_workdir --only resampler_transformer
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "3"
GROUP = "Resampler"
CHANGE = "Perceiver -> Transformer"


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.resampler.kind='transformer'"])
