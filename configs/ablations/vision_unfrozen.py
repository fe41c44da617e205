"""Paper Table 10, "Freezing vision encoder": yes -> no (pretrained, fine-tuned).

  python -m flamingo_jax.ablations --workdir demo_workdir --only vision_unfrozen
"""
from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base

TABLE = "10"
GROUP = "Freezing vision encoder"
CHANGE = "yes -> no (pretrained, fine-tuned)"
PAPER_OVERALL = 68.1 / PAPER_BASELINE  # the pretrained tower fine-tuned (random init: 61.4)


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.frozen=('lm',)"])
