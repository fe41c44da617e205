"""The tiny Llama 3.2 Vision model on a mesh of 8 (fake) devices (data x FSDP x tensor,
every parameter sharded by the trainer's logical rules: GQA cross-attention heads, the
tiled ViT, the projector, the 8 extra rows) gives the logits of one device, with
images, padded tiles and a text-only row; the scanned layout too."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_mllama_model import our_inputs  # noqa: E402
from test_mllama_text_parity import batch, converted  # noqa: E402

from flamingo_jax.model_dir import abstract_params  # noqa: E402
from flamingo_jax.models import layer_stack  # noqa: E402
from flamingo_jax.models.flamingo import Flamingo  # noqa: E402
from flamingo_jax.runtime import sharding  # noqa: E402

pytestmark = [pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices"),
              pytest.mark.slow]


def test_sharded_logits_equal_one_device():
  config, params = converted()
  ids, mask, _, tiles = batch()
  inputs = our_inputs(tiles)
  want = np.asarray(jax.jit(Flamingo(config).apply)({"params": params}, ids,
                                                     attention_mask=mask, **inputs)[0])
  cfg = sharding.mesh_config({"data": 2, "fsdp": 2, "tensor": 2, "fsdp_min_size": 1})
  mesh = sharding.make_mesh(cfg)
  for c in (config, dataclasses.replace(config, scan_layers=True)):
    target = abstract_params(c, mesh, cfg)
    specs = traverse_util.flatten_dict(jax.tree.map(lambda a: a.sharding.spec, target), sep="/")
    assert "tensor" in str(specs["xattn_block_1/attn/key/kernel" if not c.scan_layers
                                 else "xattn_blocks/attn/key/kernel"])
    assert "tensor" in str(specs["vision/blocks_0/query/kernel"])
    tree = layer_stack.to_layout(params, c)
    placed = jax.tree.map(lambda a, t: jax.device_put(np.asarray(a), t.sharding), tree, target)
    data = sharding.named(mesh, sharding.batch_spec(2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.rules):
      got = jax.jit(Flamingo(c).apply)({"params": placed}, jax.device_put(ids, data),
                                       attention_mask=jax.device_put(mask, data), **inputs)[0]
    err = np.abs(np.asarray(got) - want).max()
    print(f"mllama sharded (scan_layers={c.scan_layers}): max abs logit diff {err:.2e}")
    assert err < 1e-4
