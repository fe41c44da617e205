"""Paper Table 3, "Freezing LM": yes -> no (pretrained, fine-tuned).

  python -m flamingo_jax.ablations --workdir demo_workdir --only lm_unfrozen
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "3"
GROUP = "Freezing LM"
CHANGE = "yes -> no (pretrained, fine-tuned)"


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.frozen=('vision',)"])
