"""What keeps `--compile_only` fast, checked at tiny scale.

* The traced program of a scanned model does not grow with depth: the same
  number of jaxpr equations for 4 and 12 LM blocks (one group body each),
  where the unrolled layout grows with depth (so the count tells them apart).
* The fit check's compiler options (LLVM optimisation off: the executable is
  never run) leave XLA's memory figures exactly as a normal compile has them.
* The state layout traces the model's init once, not once per use.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.trainers.flamingo import layout
from flamingo_jax.models.config import FlamingoConfig, ResamplerConfig, VisionConfig, XAttnConfig, lm_preset, model_config
from flamingo_jax.models.flamingo import Flamingo
from flamingo_jax.training import optim, state as state_lib
from flamingo_jax.runtime import sharding

V, IMG, EOC = 64, 61, 62


def config_of(num_layers, every, scan=True, remat="block"):
  return model_config(FlamingoConfig(
      vision=VisionConfig(name="none"), vision_feature_dim=16,
      resampler=ResamplerConfig(depth=1, width=16, num_heads=2, head_dim=8, num_latents=3,
                                max_frames=1),
      xattn=XAttnConfig(every=every, num_heads=4, head_dim=8),
      lm=lm_preset("chinchilla", vocab_size=V, num_layers=num_layers, width=32, num_heads=4,
                   head_dim=8, ffw_dim=48),
      image_token_id=IMG, eoc_token_id=EOC, scan_layers=scan, remat=remat))


def inputs():
  tokens = np.full((2, 8), 5, np.int32)
  tokens[:, 1] = IMG
  return jnp.asarray(tokens), jnp.zeros((2, 1, 1, 4, 16), jnp.float32)


def loss_and_grad(config):
  """(fn(params, tokens, feats) -> (loss, grads), abstract params): a train-like step
  (shapes only: an eager init would cost more than everything else here)."""
  model = Flamingo(config)
  tokens, feats = inputs()
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens,
                                             visual_features=feats)["params"])

  def loss(p, tokens, feats):
    logits, _ = model.apply({"params": p}, tokens, visual_features=feats)
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1))

  return jax.value_and_grad(loss), params


def count_eqns(jaxpr) -> int:
  """Equations of a jaxpr and of every sub-jaxpr (a scan body counts once)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += count_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += count_eqns(sub)
  return n


def traced_size(config) -> int:
  fn, params = loss_and_grad(config)
  return count_eqns(jax.make_jaxpr(fn)(params, *inputs()).jaxpr)


@pytest.mark.parametrize("every", [1, 2])
def test_scanned_program_does_not_grow_with_depth(every):
  assert traced_size(config_of(4, every)) == traced_size(config_of(12, every))
  unrolled = [traced_size(config_of(n, every, scan=False)) for n in (4, 8)]
  assert unrolled[1] > 1.5 * unrolled[0]


def test_fit_check_options_keep_memory_figures():
  fn, params = loss_and_grad(config_of(2, 1))
  lowered = jax.jit(fn).lower(params, *inputs())
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes")
  default = lowered.compile().memory_analysis()
  fit = lowered.compile(state_lib.FIT_CHECK_COMPILER_OPTIONS).memory_analysis()
  assert default.temp_size_in_bytes > 0
  assert [getattr(fit, f) for f in fields] == [getattr(default, f) for f in fields]


def test_state_layout_traces_init_once(monkeypatch):
  config = config_of(2, 1)
  calls = []
  call = Flamingo.__call__
  monkeypatch.setattr(Flamingo, "__call__", lambda self, *a, **k: (calls.append(1),
                                                                    call(self, *a, **k))[1])
  mesh = sharding.make_mesh(sharding.mesh_config({}), jax.devices()[:1])
  optim_cfg = optim.optim_config({})
  tx = layout.make_optimizer(optim_cfg, config, 10)
  lay = layout.state_layout(Flamingo(config), config, tx, mesh, sharding.mesh_config({}))
  assert len(calls) == 1
  # the same shapes and dtypes as the init the trainer runs (trainable f32, frozen bf16)
  want = jax.eval_shape(layout.make_init_params(Flamingo(config), config, jnp.bfloat16),
                        jax.random.key(0))
  got = (lay.train_abs, lay.frozen_abs)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert [(a.shape, a.dtype) for a in jax.tree.leaves(got)] == \
      [(a.shape, a.dtype) for a in jax.tree.leaves(want)]
