"""The shapes of Llama 3.2 Vision 11B and 90B as their hub config.json files give them
(the fields that shape the model), turned into our model config by the converter's own
mapping (flamingo_jax.convert.mllama.flamingo_config), so a converted checkpoint and
these configs agree. Used by configs/mllama_{11b,90b}.py."""
import dataclasses

import ml_collections

from flamingo_jax.config import to_config_dict
from flamingo_jax.convert.mllama import flamingo_config

ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=8192)
VISION = dict(hidden_size=1280, attention_heads=16, intermediate_size=5120,
              num_hidden_layers=32, num_global_layers=8, image_size=560, patch_size=14,
              max_num_tiles=4, vision_output_dim=7680, norm_eps=1e-5,
              intermediate_layers_indices=[3, 7, 15, 23, 30])
TEXT = {
    "11b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, num_hidden_layers=40,
                cross_attention_layers=list(range(3, 40, 5))),
    "90b": dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, num_hidden_layers=100,
                cross_attention_layers=list(range(3, 100, 5))),
}


def hf_config(size: str) -> dict:
  """config.json (model_type mllama) of the size's hub checkpoint, shape fields only."""
  text = dict(TEXT[size], vocab_size=128256, rms_norm_eps=1e-5, rope_parameters=ROPE,
              max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
              pad_token_id=128004, hidden_act="silu", tie_word_embeddings=False)
  return dict(model_type="mllama", image_token_index=128256, text_config=text,
              vision_config=dict(VISION))


def get_config(arg: str = "11b") -> ml_collections.ConfigDict:
  """arg: SIZE[,ROW_MASK], SIZE 11b | 90b, ROW_MASK transformers (default) | meta."""
  size, *rest = arg.split(",")
  if size not in TEXT or len(rest) > 1:
    raise ValueError(f"configs/mllama_shapes.py takes 11b|90b[,transformers|meta], got {arg!r}")
  model = flamingo_config(hf_config(size), rest[0] if rest else "transformers")
  # bfloat16 compute, layers scanned (compile time flat in depth), fused attention
  model = dataclasses.replace(model, dtype="bfloat16", scan_layers=True, attention="auto")
  return ml_collections.ConfigDict({"model": to_config_dict(model)})
