"""Paper Table 3, "Vision encoder": NFNet -> a ViT-style patch encoder (the
CLIP ViT-L/14 row in miniature), pretrained contrastively on the same pairs
(configs/contrastive_tiny.py:vision=patch, 32 px) before Flamingo trains on it.

  python -m flamingo_jax.ablations --workdir demo_workdir --only vision_patch_encoder
"""
import os

from flamingo_jax.apps.ablations import PAPER_BASELINE, demo_base
from flamingo_jax.config import to_config_dict
from flamingo_jax.models.config import PatchEncoderConfig, VisionConfig

TABLE = "3"
GROUP = "Vision encoder"
CHANGE = "NFNet (64 px) -> patch encoder (32 px, patch 8)"
PAPER_OVERALL = 64.9 / PAPER_BASELINE  # NFNet-F6 -> CLIP ViT-L/14 (-> NFNet-F0: 62.7)


def get_config(workdir="demo_workdir"):
  config = demo_base(workdir)
  vision = VisionConfig(name="patch", image_size=32,
                        patch=PatchEncoderConfig(patch_size=8, width=32, depth=1))
  with config.unlocked():
    config.model.vision = to_config_dict(vision)
    config.data.image.size = vision.image_size
    config.model_init.vision = os.path.join(os.path.abspath(workdir), "ablations",
                                            "_patch_tower", "export", "vision")
    config.ablation_vision = "patch"  # flamingo_jax.apps.ablations pretrains it when missing
  return config
