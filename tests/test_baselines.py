"""The demo's baselines: gates at zero compute the LM alone; chance is image-blind."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.config import model_config
from flamingo_jax.config import load_config
from flamingo_jax.evaluate import baselines
from flamingo_jax.model_dir import init_params
from flamingo_jax.models.flamingo import Flamingo, merged_lm_params
from flamingo_jax.models.lm import DecoderLM


def test_zero_gates_gives_the_lm_alone():
  config = model_config(load_config(os.path.join(os.path.dirname(__file__), "..", "configs",
                                                 "tiny.py")))
  params = init_params(config, seed=1)
  # Open every gate so the images matter, then close them again.
  opened = {k: ({g: jnp.full_like(v, 0.7) if g in baselines.GATES else v
                 for g, v in p.items()} if k.startswith("xattn_block_") else p)
            for k, p in params.items()}
  closed = baselines.zero_gates(opened)
  assert baselines.gates_are_zero(closed) and not baselines.gates_are_zero(opened)
  tokens = jnp.array([[1, config.image_token_id, 5, 6, 7]], jnp.int32)
  images = jax.random.normal(jax.random.key(0), (1, 1, 1, 32, 32, 3))
  apply = jax.jit(lambda p: Flamingo(config).apply({"params": p}, tokens, images=images)[0])
  lm = jax.jit(lambda p: DecoderLM(config.lm).apply({"params": p}, tokens))(
      merged_lm_params(closed, config))
  np.testing.assert_allclose(apply(closed), lm, atol=1e-5)
  assert float(jnp.max(jnp.abs(apply(opened) - lm))) > 1e-3
  with pytest.raises(ValueError, match="no xattn_block"):
    baselines.zero_gates({"lm": {}})
