"""Inference for people: a model directory, images and a prompt -> the completion.

  python -m flamingo_jax.generate --checkpoint DIR --image a.png --prompt "A photo of"
  python -m flamingo_jax.generate --checkpoint DIR --image a.png --image b.png \
      --prompt "<image>A red square.<EOC><image>A"

DIR is a model directory (flamingo_jax/model_dir.py): DIR/params (orbax
checkpoint of the whole unboxed Flamingo param tree), DIR/model_config.json
(the config's `model` section) and DIR/tokenizer.model (sentencepiece). The
converters write the first two (`flamingo_jax/convert`); `export_model_dir`
writes all three from params in memory (the demo, a finished training run);
`model_dir.load` reads them, the params straight into their shardings.

The prompt is tokenized as the evaluation does (`evaluate.inputs.encode_prompt`:
BOS, text pieces, `<image>` / `<EOC>` markers as their ids) and decoded with
`evaluate.decode` (KV cache, cross-attention keys/values once per prompt).
The completion goes to stdout; logs go to stderr.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
import time
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from flamingo_jax import model_dir
from flamingo_jax.runtime import distributed
from flamingo_jax.config import apply_overrides
from flamingo_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.errors import ArgumentParser, run_cli
from flamingo_jax.evaluate import decode, prompts
from flamingo_jax.evaluate.inputs import encode_prompt, load_image
from flamingo_jax.models.config import FlamingoConfig

log = logging.getLogger("flamingo_jax.apps.generate")  # not "__main__" under -m

IMAGE_MARKER = prompts.IMAGE_MARKER


# ------------------------------------------------------------------------------ inputs


def place_images(prompt: str, num_images: int) -> str:
  """The prompt with its `<image>` markers matching `num_images`: one image and no
  marker puts the image first; any other mismatch is a ValueError."""
  n = prompt.count(IMAGE_MARKER)
  if n == 0 and num_images == 1:
    return IMAGE_MARKER + prompt
  if n != num_images:
    raise ValueError(f"the prompt has {n} {IMAGE_MARKER} markers but {num_images} images "
                     f"were given (--image); each {IMAGE_MARKER} takes the next image in "
                     "order, and only a single image may go without a marker")
  return prompt


def build_inputs(prompt: str, image_paths: Sequence[str], config: FlamingoConfig,
                 tokenizer: Tokenizer, image_mean: Sequence[float] = IMAGENET_MEAN,
                 image_std: Sequence[float] = IMAGENET_STD
                 ) -> tuple[str, list[int], Optional[np.ndarray]]:
  """-> (prompt with its markers, prompt ids, images [N, 1, H, W, 3] float32 or None).

  Images are preprocessed as in evaluation (`inputs.load_image`: longer side
  to the model's size, mean padding, (x - mean) / std in 0..255 units).
  """
  text = place_images(prompt, len(image_paths))
  images = None
  if image_paths:
    if config.vision.name == "none":
      raise ValueError("the model has no vision encoder (model.vision.name is 'none'), so "
                       "it cannot read image files")
    size = config.vision.image_size
    images = np.stack([load_image(p, size, tuple(image_mean), tuple(image_std))
                       for p in image_paths])
  return text, encode_prompt(text, tokenizer), images


def decode_options(tokenizer: Tokenizer, *, max_new_tokens: int = 20, num_beams: int = 1,
                   temperature: Optional[float] = None, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> decode.DecodeConfig:
  """Greedy by default; beam search with num_beams > 1; sampling when any of
  temperature / top_k / top_p is set. Stops at the tokenizer's EOS too."""
  sample = any(v is not None for v in (temperature, top_k, top_p))
  if sample and num_beams > 1:
    raise ValueError(f"num_beams={num_beams} and sampling (temperature / top_k / top_p) "
                     "exclude each other: pick beam search or sampling")
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  info = tokenizer.info
  method = "sample" if sample else "beam" if num_beams > 1 else "greedy"
  return decode.DecodeConfig(
      method=method, max_new_tokens=max_new_tokens, num_beams=num_beams,
      temperature=1.0 if temperature is None else temperature,
      top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
      stop_token_ids=(info.eos_id,), vocab_limit=info.vocab_size, pad_token_id=info.pad_id)


# ------------------------------------------------------------------------------ generation


def complete(params, config: FlamingoConfig, ids: Sequence[int], images: Optional[np.ndarray],
             options: decode.DecodeConfig, *, stop_at_eoc: bool = True, seed: int = 0,
             prompt_buckets: Sequence[int] = decode.DEFAULT_BUCKETS,
             placement: Optional[decode.Placement] = None) -> list[int]:
  """New token ids for one prompt (ids [P], images [N, T, H, W, 3] or None), without
  the final stop token.

  The prompt is left padded to a length bucket so that prompts of similar
  length share a compilation. `decode.generate` always stops at `<EOC>`; with
  stop_at_eoc=False an `<EOC>` is kept and generation resumes from prompt +
  tokens so far, until EOS or max_new_tokens.
  """
  placement = placement or decode.Placement()
  if placement.mesh is None:
    fn = decode.compiled_generate(config, options)
  else:  # params in their shardings; the one prompt replicated
    fn = jax.jit(functools.partial(decode.generate, config=config, options=options),
                 in_shardings=(placement.param_shardings,) + (placement.replicated,) * 5)
  imgs = None if images is None else decode.stack_images([images], len(images))
  if options.method == "beam" and not stop_at_eoc:
    log.info("beam search restarts after each <EOC> (stop_at_eoc off)")
  if config.lm.positions == "learned" and len(ids) + options.max_new_tokens > \
      config.lm.max_length:
    raise ValueError(f"{len(ids)} prompt tokens + max_new_tokens {options.max_new_tokens} "
                     f"exceed model.lm.max_length {config.lm.max_length} (learned positions)")
  rng = jax.random.key(seed)
  out: list[int] = []
  while len(out) < options.max_new_tokens:
    seq = list(ids) + out
    tokens, mask = decode.left_pad([seq], decode.bucket(len(seq), prompt_buckets),
                                   options.pad_token_id)
    result = placement.run(fn, params, tokens, mask, imgs, None,
                           jax.random.fold_in(rng, len(out)))
    toks, lengths = placement.fetch((result.tokens, result.lengths))
    new = [int(t) for t in toks[0, :lengths[0]]]
    out += new
    if stop_at_eoc or not new or new[-1] != config.eoc_token_id:
      break
  out = out[:options.max_new_tokens]
  stops = set(options.stop_token_ids) | ({config.eoc_token_id} if stop_at_eoc else set())
  if out and out[-1] in stops:
    out = out[:-1]
  return out


def generate_text(model: model_dir.Model, prompt: str, image_paths: Sequence[str] = (), *,
                  options: Optional[decode.DecodeConfig] = None, stop_at_eoc: bool = True,
                  seed: int = 0, image_mean: Sequence[float] = IMAGENET_MEAN,
                  image_std: Sequence[float] = IMAGENET_STD) -> dict:
  """-> {"prompt": the prompt with its markers, "completion": text, "tokens": new ids}."""
  inputs = build_inputs(prompt, image_paths, model.config, model.tokenizer, image_mean,
                        image_std)
  return _run(model, inputs, options or decode_options(model.tokenizer), stop_at_eoc, seed)


def _run(model: model_dir.Model, inputs, options: decode.DecodeConfig, stop_at_eoc: bool,
         seed: int, placement: Optional[decode.Placement] = None) -> dict:
  text, ids, images = inputs
  t0 = time.time()
  tokens = complete(model.params, model.config, ids, images, options,
                    stop_at_eoc=stop_at_eoc, seed=seed, placement=placement)
  log.info("%d prompt tokens, %d image(s) -> %d new tokens in %.1f s (compilation "
           "included)", len(ids), 0 if images is None else len(images), len(tokens),
           time.time() - t0)
  return {"prompt": text, "completion": model.tokenizer.decode(tokens), "tokens": tokens}


# ------------------------------------------------------------------------------ CLI


def _floats(text: str, what: str) -> tuple[float, ...]:
  try:
    values = tuple(float(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"--{what} must be 3 comma-separated numbers, got {text!r}") from None
  if len(values) != 3:
    raise ValueError(f"--{what} must be 3 comma-separated numbers (RGB), got {text!r}")
  return values


def mesh_section(argv: Sequence[str]) -> tuple[list[str], dict]:
  """argv without its `--mesh.AXIS=N` flags, and those as a `mesh` section."""
  rest, overrides = model_dir.mesh_flags(argv)
  cfg = apply_overrides(ml_collections.ConfigDict({"mesh": {}}), overrides, open_keys=("mesh",))
  return rest, cfg.mesh.to_dict()


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """The CLI; prints the completion (or --json) and returns generate_text's dict."""
  p = ArgumentParser(
      prog="python -m flamingo_jax.generate",
      description="Complete a prompt with interleaved images using a model directory "
      "(DIR/params, DIR/model_config.json, DIR/tokenizer.model); --mesh.tensor=N (and "
      "--mesh.fsdp / --mesh.data) shards the params over the devices. Prints only the completion "
      "on stdout; logs go to stderr.")
  p.add_argument("--checkpoint", required=True, metavar="DIR",
                 help="model directory (export_model_dir or a converter wrote it)")
  p.add_argument("--prompt", required=True,
                 help=f"text; each literal {IMAGE_MARKER} takes the next --image in order, "
                 "<EOC> ends a chunk. With a single --image and no marker the image is "
                 "placed at the start")
  p.add_argument("--image", action="append", default=[], metavar="PATH",
                 help="an image file; repeat for several images (in prompt order)")
  p.add_argument("--tokenizer", default=None, metavar="PATH",
                 help="the model's tokenizer: a sentencepiece .model (or a Hugging Face "
                 "tokenizer.json); default: DIR/tokenizer.model")
  p.add_argument("--max_new_tokens", type=int, default=20, help="default: %(default)s")
  p.add_argument("--num_beams", type=int, default=1,
                 help="> 1: beam search (default: 1, greedy)")
  p.add_argument("--temperature", type=float, default=None,
                 help="sample with this temperature (any of --temperature / --top_k / "
                 "--top_p switches from greedy to sampling)")
  p.add_argument("--top_k", type=int, default=None, help="sample from the k most likely ids")
  p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--stop_at_eoc", action="store_true", default=True,
                 help="stop at the first <EOC> (the default)")
  p.add_argument("--no_stop_at_eoc", action="store_false", dest="stop_at_eoc",
                 help="keep each <EOC> and go on to EOS or --max_new_tokens")
  p.add_argument("--image_mean", default=",".join(map(str, IMAGENET_MEAN)),
                 help="RGB mean in 0..255 units (the evaluation's default: ImageNet)")
  p.add_argument("--image_std", default=",".join(map(str, IMAGENET_STD)),
                 help="RGB std in 0..255 units")
  p.add_argument("--json", action="store_true",
                 help='print {"prompt": ..., "completion": ..., "tokens": [...]} instead')
  p.add_argument("--fake_devices", type=int, default=0, metavar="N",
                 help="run on N fake CPU devices (try a --mesh.* sharding without them)")
  argv, section = mesh_section(list(sys.argv[1:] if argv is None else argv))
  a = p.parse_args(argv)
  distributed.fake_cpu_devices(a.fake_devices)
  mean, std = _floats(a.image_mean, "image_mean"), _floats(a.image_std, "image_std")
  if min(std) <= 0:
    raise ValueError(f"--image_std must be positive, got {a.image_std!r}")
  # Prompt, image and tokenizer problems are reported before the params are read.
  place_images(a.prompt, len(a.image))
  model_dir.check_not_lm_only(a.checkpoint)
  config = model_dir.read_model_config(a.checkpoint)
  tokenizer = model_dir.load_tokenizer(a.checkpoint, config, a.tokenizer)
  options = decode_options(tokenizer, max_new_tokens=a.max_new_tokens, num_beams=a.num_beams,
                           temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
  options.validate(config)
  inputs = build_inputs(a.prompt, a.image, config, tokenizer, mean, std)
  mesh, mesh_cfg = model_dir.device_mesh(section)
  model = model_dir.load(a.checkpoint, mesh=mesh, mesh_cfg=mesh_cfg, tokenizer=tokenizer,
                         config=config)
  result = _run(model, inputs, options, a.stop_at_eoc, a.seed,
                decode.Placement.of(model.params, mesh, mesh_cfg))
  print(json.dumps(result) if a.json else result["completion"], flush=True)
  return result


def cli_main() -> int:
  """`python -m flamingo_jax.generate`: exit status 0, or 2 with one `error:` line for bad input."""
  logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
  log.setLevel(logging.INFO)
  return run_cli(main)


if __name__ == "__main__":
  sys.exit(cli_main())
