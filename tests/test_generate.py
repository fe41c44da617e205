"""`python -m flamingo_jax.generate`: a model directory + PNGs + a prompt -> the completion.

A tiny Flamingo (configs/tiny.py with a real tiny sentencepiece vocabulary),
random params with the cross-attention gates opened so the images matter,
exported with `export_model_dir`. The CLI's tokens must equal
`decode.generate` called directly on hand-built inputs.
"""
import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flamingo_jax.apps import generate as gen
from flamingo_jax import model_dir
from flamingo_jax.models.config import model_config
from flamingo_jax.config import load_config
from flamingo_jax.data.train_tokenizer import train_tokenizer
from flamingo_jax.evaluate import decode
from flamingo_jax.evaluate.inputs import load_image
from flamingo_jax.models.flamingo import Flamingo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["a red square on a blue field", "two green circles", "a small yellow triangle",
          "a big red circle", "three blue squares", "a green square and a red circle"]
MAX_NEW = 8


def _write_png(path, seed, size):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
  return str(path)


def _random_params(config, seed):
  """Random values in the shapes of the Flamingo param tree (numpy: a jitted init would
  cost a compilation). The tanh gates are open so the completion depends on the
  images; unit-scale input embeddings make the next token depend on the text; zero
  output rows for `<image>`/`<EOC>` keep greedy completions full length."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("_gate']"):
      return np.full(x.shape, 0.8, np.float32)
    if name.endswith("scale']"):
      return (1.0 + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
    if name.endswith(("bias']", "['new_token_unembeddings']")):
      return np.zeros(x.shape, np.float32)
    std = 1.0 if name.endswith(("['embedding']", "['new_token_embeddings']")) else (
        x.shape[0] ** -0.5 if len(x.shape) > 1 else 0.1)
    return (std * rng.normal(size=x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, model_dir.init_params(config, abstract=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("generate")
  (root / "corpus.txt").write_text("\n".join(CORPUS * 3))
  tok = train_tokenizer([str(root / "corpus.txt")], 96, str(root / "tok"), model_type="bpe")
  info = tok.info
  tiny = model_config(load_config(os.path.join(REPO, "configs", "tiny.py")))
  config = model_config(dataclasses.replace(  # untied: <EOC>'s output row is its own
      tiny, lm=dataclasses.replace(tiny.lm, vocab_size=info.vocab_size, tie_embeddings=False),
      image_token_id=info.image_token_id, eoc_token_id=info.eoc_token_id))
  directory = model_dir.export_model_dir(str(root / "model"), config,
                                         _random_params(config, 3),
                                         str(root / "tok" / "tokenizer.model"))
  # The references use the params as the CLI loads them (and share its compilations).
  params = model_dir.load(directory).params
  images = {"a": _write_png(root / "a.png", 0, (40, 28)),
            "b": _write_png(root / "b.png", 1, (32, 32))}
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  return dict(root=root, tok=tok, config=config, params=params, dir=directory, images=images,
              tok_path=str(root / "tok" / "tokenizer.model"))


def _greedy_options(tok, max_new=MAX_NEW):
  info = tok.info
  return decode.DecodeConfig(method="greedy", max_new_tokens=max_new, num_beams=1,
                             stop_token_ids=(info.eos_id,), vocab_limit=info.vocab_size,
                             pad_token_id=info.pad_id)


@functools.lru_cache(maxsize=None)
def _direct_fn(config, options):
  return jax.jit(functools.partial(decode.generate, config=config, options=options))


def _direct(w, ids, image_names):
  """decode.generate on unpadded ids [1, P] and images [1, N, 1, H, W, 3]; stop token cut."""
  size = w["config"].vision.image_size
  images = np.stack([load_image(w["images"][n], size) for n in image_names])[None]
  options = _greedy_options(w["tok"])
  out = _direct_fn(w["config"], options)(w["params"], jnp.asarray([ids], jnp.int32), None,
                                         jnp.asarray(images))
  toks = [int(t) for t in np.asarray(out.tokens)[0, :int(out.lengths[0])]]
  info = w["tok"].info
  if toks and toks[-1] in (info.eoc_token_id, info.eos_id):
    toks = toks[:-1]
  return toks


def _ids(w, *pieces):
  """<BOS> then each piece: a str is tokenized, an int is a special id."""
  ids = [w["tok"].info.bos_id]
  for p in pieces:
    ids += w["tok"].encode(p) if isinstance(p, str) else [p]
  return ids


def test_one_image_equals_decode_generate(world, capsys):
  w, info = world, world["tok"].info
  result = gen.main(["--checkpoint", w["dir"], "--image", w["images"]["a"],
                     "--prompt", "a red", "--max_new_tokens", str(MAX_NEW)])
  want = _direct(w, _ids(w, info.image_token_id, "a red"), ["a"])
  assert result["tokens"] == want and len(want) == MAX_NEW
  assert result["prompt"] == "<image>a red"  # a lone image goes first
  assert result["completion"] == w["tok"].decode(want)
  assert capsys.readouterr().out == result["completion"] + "\n"


def test_mesh_sharded_params_same_tokens(world):
  """--mesh.tensor=2 (data takes the other 4 of 8 fake devices): the params restored
  straight into tensor-parallel shardings give the one-device completion."""
  if len(jax.devices()) < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  w = world
  args = ["--checkpoint", w["dir"], "--image", w["images"]["a"], "--prompt", "a red",
          "--max_new_tokens", str(MAX_NEW)]
  one = gen.main(args)
  sharded = gen.main(args + ["--mesh.tensor=2"])
  assert sharded["tokens"] == one["tokens"] and len(one["tokens"]) == MAX_NEW


def test_two_images_interleaved(world, capsys):
  w, info = world, world["tok"].info
  prompt = "<image>a red square<EOC><image>a"
  result = gen.main(["--checkpoint", w["dir"], "--image", w["images"]["a"], "--image",
                     w["images"]["b"], "--prompt", prompt, "--max_new_tokens", str(MAX_NEW),
                     "--json"])
  ids = _ids(w, info.image_token_id, "a red square", info.eoc_token_id, info.image_token_id,
             "a")
  want = _direct(w, ids, ["a", "b"])
  assert result["tokens"] == want and len(want) == MAX_NEW
  printed = json.loads(capsys.readouterr().out)
  assert printed == {"prompt": prompt, "completion": w["tok"].decode(want), "tokens": want}
  # The other order: markers take the images in --image order, and the images matter.
  swapped = gen.main(["--checkpoint", w["dir"], "--image", w["images"]["b"], "--image",
                      w["images"]["a"], "--prompt", prompt, "--max_new_tokens", str(MAX_NEW)])
  assert swapped["tokens"] == _direct(w, ids, ["b", "a"]) != want
  # The images are in marker order.
  _, _, images = gen.build_inputs(prompt, [w["images"]["a"], w["images"]["b"]], w["config"],
                                  w["tok"])
  assert images.shape == (2, 1, 32, 32, 3)
  np.testing.assert_array_equal(images[1, 0], load_image(w["images"]["b"], 32)[0])


def test_tokenizer_override_and_top_k_1_sampling(world, tmp_path):
  """--tokenizer replaces a missing DIR/tokenizer.model; top-k 1 sampling is greedy."""
  w = world
  bare = tmp_path / "bare"
  os.makedirs(bare)
  shutil.copy(os.path.join(w["dir"], model_dir.MODEL_CONFIG), bare)
  os.symlink(os.path.join(w["dir"], model_dir.PARAMS), bare / model_dir.PARAMS)
  args = ["--checkpoint", str(bare), "--image", w["images"]["a"], "--prompt", "a red",
          "--max_new_tokens", str(MAX_NEW)]
  with pytest.raises(ValueError, match="lacks tokenizer.model.*--tokenizer"):
    gen.main(args)
  greedy = gen.main(args + ["--tokenizer", w["tok_path"]])
  sampled = gen.main(args + ["--tokenizer", w["tok_path"], "--top_k", "1", "--seed", "5"])
  assert sampled["tokens"] == greedy["tokens"]


@functools.lru_cache(maxsize=None)
def _forward_fn(config):
  model = Flamingo(config)
  return jax.jit(lambda p, t, i: model.apply({"params": p}, t, images=i)[0])


def _next_logits(w, params, ids, image_names, length):
  """[V] logits after `ids` (a full forward over a buffer of `length`; causal, so the
  slots after `ids` do not matter), `<image>` banned as in decoding."""
  config = w["config"]
  size = config.vision.image_size
  images = np.stack([load_image(w["images"][n], size) for n in image_names])[None]
  buf = np.zeros((1, length), np.int32)
  buf[0, :len(ids)] = ids
  logits = np.array(_forward_fn(config)(params, buf, images))[0, len(ids) - 1]
  logits[w["tok"].info.image_token_id] = -np.inf
  return logits


def _reference_chain(w, params, ids, image_names, steps):
  """Greedy by full forwards, `<EOC>` not a stop; ends after EOS."""
  out = []
  for _ in range(steps):
    out.append(int(np.argmax(_next_logits(w, params, ids + out, image_names,
                                          len(ids) + steps))))
    if out[-1] == w["tok"].info.eos_id:
      break
  return out


def test_no_stop_at_eoc_goes_on(world):
  """<EOC> made to come first: its output row is 1.05x the first greedy token's, and
  read back it acts as a token after which the model says something else. stop_at_eoc
  stops there; --no_stop_at_eoc keeps it and goes on (resuming from prompt + tokens so
  far) exactly as the full-forward greedy chain does."""
  w, info = world, world["tok"].info
  ids = _ids(w, info.image_token_id, "two")
  length = len(ids) + MAX_NEW  # one buffer shape: one compilation of the forward
  _, _, images = gen.build_inputs("<image>two", [w["images"]["a"]], w["config"], w["tok"])
  x = int(np.argmax(_next_logits(w, w["params"], ids, ["a"], length)))

  def leads_elsewhere(y):  # after y the best token beats x even with x's logit x 1.05
    logits = _next_logits(w, w["params"], ids + [y], ["a"], length)
    best = np.max(np.delete(logits, [x, info.eoc_token_id]))
    return best > 1.05 * logits[x] + 0.1

  y = next(y for y in range(4, w["tok"].piece_size) if leads_elsewhere(y))
  params = dict(w["params"])
  unembed = params["lm"]["unembed"]["kernel"]  # [D, V]; the model's LM is untied
  params["new_token_unembeddings"] = params["new_token_unembeddings"].at[1].set(
      1.05 * unembed[:, x])
  params["new_token_embeddings"] = params["new_token_embeddings"].at[1].set(
      params["lm"]["embedding"][y])
  chain = _reference_chain(w, params, ids, ["a"], MAX_NEW)
  assert chain[0] == info.eoc_token_id and chain[1] != info.eoc_token_id, chain
  options = gen.decode_options(w["tok"], max_new_tokens=MAX_NEW)
  assert gen.complete(params, w["config"], ids, images, options) == []
  go_on = gen.complete(params, w["config"], ids, images, options, stop_at_eoc=False)
  assert go_on == [t for t in chain if t != info.eos_id]
  assert w["tok"].decode(go_on).startswith("<EOC>")


def test_errors_name_the_problem(world, tmp_path):
  w = world
  a, b = w["images"]["a"], w["images"]["b"]

  def run(*args, checkpoint=None):
    return gen.main(["--checkpoint", checkpoint or w["dir"], *args])

  with pytest.raises(ValueError, match="1 <image> markers but 2 images"):
    run("--image", a, "--image", b, "--prompt", "<image>two")
  with pytest.raises(ValueError, match="0 <image> markers but 2 images"):
    run("--image", a, "--image", b, "--prompt", "two")
  with pytest.raises(ValueError, match="1 <image> markers but 0 images"):
    run("--prompt", "<image>two")
  with pytest.raises(ValueError, match="cannot read image .*missing.png"):
    run("--image", str(tmp_path / "missing.png"), "--prompt", "two")
  with pytest.raises(ValueError, match="corrupt.png.*cannot decode image"):
    run("--image", str(w["root"] / "corrupt.png"), "--prompt", "two")
  # Model directories missing a piece.
  with pytest.raises(ValueError, match="model directory .* does not exist"):
    run("--image", a, "--prompt", "two", checkpoint=str(tmp_path / "nowhere"))
  no_config = tmp_path / "no_config"
  os.makedirs(no_config)
  os.symlink(os.path.join(w["dir"], model_dir.PARAMS), no_config / model_dir.PARAMS)
  with pytest.raises(ValueError, match="lacks model_config.json"):
    run("--image", a, "--prompt", "two", checkpoint=str(no_config))
  no_params = tmp_path / "no_params"
  os.makedirs(no_params)
  for name in (model_dir.MODEL_CONFIG, model_dir.TOKENIZER):
    shutil.copy(os.path.join(w["dir"], name), no_params)
  with pytest.raises(ValueError, match="lacks params/"):
    run("--image", a, "--prompt", "two", checkpoint=str(no_params))
  # Bytes overwritten inside the params' array data: one short line naming the array.
  damaged = tmp_path / "damaged"
  shutil.copytree(w["dir"], damaged)
  data = [os.path.join(r, f) for r, _, fs in os.walk(damaged / model_dir.PARAMS) for f in fs
          if os.path.basename(r) == "d"]
  big = max(data, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.seek(os.path.getsize(big) // 2)
    f.write(bytes(range(3, 256, 5)) * 4)
  with pytest.raises(ValueError, match=rf"^checkpoint at {damaged}/params: array \S+: ") as e:
    run("--image", a, "--prompt", "two", checkpoint=str(damaged))
  assert len("error: " + str(e.value)) < 200 and "{" not in str(e.value)
  # A tokenizer whose special ids are not the model's.
  info = w["tok"].info
  swapped = dict(json.loads(open(os.path.join(w["dir"], model_dir.MODEL_CONFIG)).read()),
                 image_token_id=info.eoc_token_id, eoc_token_id=info.image_token_id)
  bad = tmp_path / "bad_ids"
  shutil.copytree(no_params, bad)
  (bad / model_dir.MODEL_CONFIG).write_text(json.dumps(swapped))
  with pytest.raises(ValueError, match=r"tokenizer .* does not fit .*<image> id is "
                     rf"{info.image_token_id} but model.image_token_id is {info.eoc_token_id}"):
    run("--image", a, "--prompt", "two", checkpoint=str(bad))
  (w["root"] / "small.txt").write_text("\n".join(CORPUS))
  small = train_tokenizer([str(w["root"] / "small.txt")], 40, str(w["root"] / "small"),
                          model_type="bpe")
  with pytest.raises(ValueError, match="<image> id is"):
    run("--image", a, "--prompt", "two", "--tokenizer", str(w["root"] / "small" /
                                                             "tokenizer.model"))
  with pytest.raises(ValueError, match="export_model_dir: tokenizer .*<image> id is"):
    model_dir.export_model_dir(str(tmp_path / "never"), w["config"], w["params"], small)
  assert not os.path.exists(tmp_path / "never")
  with pytest.raises(ValueError, match="pick beam search or sampling"):
    run("--image", a, "--prompt", "two", "--num_beams", "3", "--temperature", "0.7")
