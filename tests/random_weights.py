"""Random model weights for tests, without a jitted init (which takes ~20 s to
compile for a Flamingo on a CPU)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_params(model, *inputs, scale=0.2):
  """Random params of the init's shapes for `model.init(key, *inputs)`, drawn in numpy
  (a jitted init of this model takes ~20 s to compile on a CPU). Norm scales near 1,
  everything else (gates and new-token rows too) normal(0, scale)."""
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *inputs)["params"]))
  rng = np.random.default_rng(0)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), s.dtype)
    return jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
