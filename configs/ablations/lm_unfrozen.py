"""Paper Table 3, "Freezing LM": yes -> no (pretrained, fine-tuned).

  python -m flamingo_jax.ablations --workdir demo_workdir --only lm_unfrozen
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "3"
GROUP = "Freezing LM"
CHANGE = "yes -> no (pretrained, fine-tuned)"
PAPER_OVERALL = 62.7 / PAPER_BASELINE


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.frozen=('vision',)"])
