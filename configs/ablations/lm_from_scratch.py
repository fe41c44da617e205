"""Paper Table 3, "Freezing LM": yes -> no (random init, trained).

  python -m flamingo_jax.ablations --workdir demo_workdir --only lm_from_scratch
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "3"
GROUP = "Freezing LM"
CHANGE = "yes -> no (random init, trained)"
PAPER_OVERALL = 57.8 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  config = demo_base(workdir, ["model.frozen=('vision',)"])
  with config.model_init.unlocked():
    del config.model_init["lm"]
  return config
