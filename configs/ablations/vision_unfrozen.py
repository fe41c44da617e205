"""Paper Table 10, "Freezing vision encoder": yes -> no (pretrained, fine-tuned).

  python -m flamingo_jax.ablations --workdir demo_workdir --only vision_unfrozen
"""
from flamingo_jax.ablations import demo_base, remove_datasets  # noqa: F401

TABLE = "10"
GROUP = "Freezing vision encoder"
CHANGE = "yes -> no (pretrained, fine-tuned)"


def get_config(workdir="demo_workdir"):
  return demo_base(workdir, ["model.frozen=('lm',)"])
