"""OpenFlamingo models built in the test by the real open_flamingo 2.0.1 code around
tiny HF LMs with random weights, and saved the ways OpenFlamingo saves them.

open_flamingo's package __init__ imports open_clip (which needs torchvision, not
installed here), so its `src/` modules are loaded by path under a private package
name, and the train script's `filter_state_dict_to_trainable` is compiled from
`train/train_utils.py` on its own (that module imports wandb). The vision tower is
replaced by one that returns its input as the patch tokens: these models run on
precomputed features, and the OpenCLIP tower is checked on its own (the committed
openflamingo_tiny fixture and test_vit.py).
"""
import ast
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

_PACKAGE = "_open_flamingo_ref"


def open_flamingo_root() -> str:
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None:
    pytest.skip("open-flamingo is not installed (make test installs it with --no-deps)")
  return spec.submodule_search_locations[0]


def open_flamingo_src():
  """(Flamingo, FlamingoLMMixin, extend_instance) from open_flamingo/src, loaded by path."""
  root = open_flamingo_root()
  if _PACKAGE not in sys.modules:
    pkg = types.ModuleType(_PACKAGE)
    pkg.__path__ = [root]
    sys.modules[_PACKAGE] = pkg
    src = types.ModuleType(_PACKAGE + ".src")
    src.__path__ = [os.path.join(root, "src")]
    sys.modules[_PACKAGE + ".src"] = src
  flamingo = importlib.import_module(_PACKAGE + ".src.flamingo")
  flamingo_lm = importlib.import_module(_PACKAGE + ".src.flamingo_lm")
  utils = importlib.import_module(_PACKAGE + ".src.utils")
  return flamingo.Flamingo, flamingo_lm.FlamingoLMMixin, utils.extend_instance


def filter_state_dict_to_trainable():
  """open_flamingo/train/train_utils.py's function, compiled from its source alone."""
  path = os.path.join(open_flamingo_root(), "train", "train_utils.py")
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
            and n.name == "filter_state_dict_to_trainable")
  namespace = {"torch": torch}
  exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), namespace)
  return namespace["filter_state_dict_to_trainable"]


class FeatureTower(torch.nn.Module):
  """Stands in for open_clip's tower: OpenFlamingo reshapes vision_x
  [b, T, F, S, C, 1] to [b*T*F, S, C, 1] and reads tower(x)[1] as [b*T*F, S, C]."""

  def forward(self, x):
    return None, x[..., 0]


class Clip(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.visual = FeatureTower()


def build_openflamingo(lm, *, tokenizer_len: int, decoder_layers: str, every: int,
                       vis_dim: int, seed: int = 0):
  """OpenFlamingo's factory steps on `lm` (tokens appended to a tokenizer of
  `tokenizer_len`: <|endofchunk|>, <image>, <PAD>; embeddings resized to it), then
  trained-looking weights: every trainable parameter moved off its init (gates open).
  Returns (model, eoc id, media id)."""
  Flamingo, FlamingoLMMixin, extend_instance = open_flamingo_src()
  torch.manual_seed(seed)
  if not hasattr(lm, "get_input_embeddings") or lm.get_input_embeddings() is None:
    raise ValueError("the LM needs get_input_embeddings (the factory patches MPT-1B's)")
  extend_instance(lm, FlamingoLMMixin)
  lm.set_decoder_layers_attr_name(decoder_layers)
  eoc, media = tokenizer_len, tokenizer_len + 1
  lm.resize_token_embeddings(tokenizer_len + 3)
  model = Flamingo(Clip(), lm, eoc_token_id=eoc, media_token_id=media, vis_dim=vis_dim,
                   cross_attn_every_n_layers=every).eval()
  model.requires_grad_(False)
  model.perceiver.requires_grad_(True)
  model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
  model.lang_encoder.get_input_embeddings().requires_grad_(True)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      if p.requires_grad:
        p.add_(0.3 * torch.randn(p.shape, generator=g))
  return model, eoc, media


def alias_state_dict(model) -> dict:
  """The state dict minus frozen parameters under their first names: keeps the
  `lang_encoder.gated_cross_attn_layers.*` aliases (and the per-layer copies)."""
  state = model.state_dict()
  for name, p in model.named_parameters():
    if not p.requires_grad and name in state:
      del state[name]
  return state


def train_script_state_dict(model) -> dict:
  """What OpenFlamingo's train script saves: filter_state_dict_to_trainable(model, state)."""
  return filter_state_dict_to_trainable()(model, model.state_dict())


def save(state: dict, path, wrapped: bool) -> str:
  """torch.save a raw state dict, or as the train script's checkpoint dict."""
  obj = {"epoch": 0, "model_state_dict": state, "optimizer_state_dict": {},
         "lr_scheduler_state_dict": {}} if wrapped else state
  torch.save(obj, path)
  return str(path)


def reference_logits(model, features: np.ndarray, tokens: np.ndarray,
                     attention_mask: np.ndarray) -> np.ndarray:
  """features [B, N, S, C] (one frame per image), tokens [B, L] -> logits [B, L, V]."""
  vision_x = torch.from_numpy(features)[:, :, None, :, :, None]
  with torch.no_grad():
    out = model(vision_x, torch.from_numpy(tokens), attention_mask=torch.from_numpy(
        attention_mask))
  return out.logits.float().numpy()


def interleaved_tokens(vocab: int, eoc: int, media: int, seed: int = 1):
  """tokens [2, 20] with three <image>...<|endofchunk|> chunks (two in row 1), mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (2, 20)).astype(np.int64)
  tokens[:, [2, 9, 15]] = media
  tokens[:, [8, 14, 19]] = eoc
  tokens[1, 15] = 7
  return tokens, np.ones_like(tokens)
