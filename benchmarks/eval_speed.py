"""Evaluation speed: OpenFlamingo's evaluation loop against ours, same model, same data.

  .venv/bin/python benchmarks/eval_speed.py [--queries 16] [--classes 1000] [--repeats 2]
      [--threads N] [--warm_cache]

One small OpenFlamingo model is built locally with random weights by the real
open_flamingo code (tests/openflamingo_ref.py: a Llama LM of width 256 x 4
layers, OpenFlamingo's perceiver and gated cross-attention every 2nd layer) and
converted with `python -m flamingo_jax.convert openflamingo` (the tiny OpenCLIP
tower of tests/fixtures/openflamingo_tiny in front), so both sides run the same
weights on the same images and prompts:

* captioning, 4 shots, beam 3, at most 20 new tokens, batch 8 (OpenFlamingo's
  evaluate_captioning protocol): ours is `run.evaluate` on a Karpathy file;
  OpenFlamingo's side builds each batch's prompts as its evaluate.py does and
  calls its `Flamingo.generate` (its EvalModel.get_outputs);
* classification over `--classes` class names, 4 shots, batch 8: ours scores
  each prompt once and the class names' prefix tree against that one cache
  (`Scorer`);
  OpenFlamingo's side follows its EvalModel.get_rank_classifications: the prompt
  cached once per batch (`cache_media` + `use_cache`), then one forward per class
  name against that cache (transformers' DynamicCache is cropped back to the
  prompt after each, where OpenFlamingo's tuples were reused).

OpenFlamingo's side is handed the vision features (its model runs on them: the
open_clip tower needs torchvision, not installed), so its vision encoder costs
nothing, while ours computes them, and the resampler's latents of each image,
once per run (each run starts with an empty cache). --warm_cache: our runs share
one cache directory, as the shot counts and trials of one sweep do, so the timed
runs read each image's latents from disk. Sides alternate, `--repeats`
times each after one warm-up each (compilation and first-call costs are
reported apart). Prints JSON: seconds per example per side and their ratio.
--before REV adds a third side, ours with evaluate/decode.py and scoring.py as
they were at git revision REV (docs/benchmarks.md: before and after a change,
alternated in one run).

--threads N runs both sides on the first N CPUs of this process's affinity
(XLA sizes its thread pool from it) with torch.set_num_threads(N); default: all
of them. torch's OpenMP threads can spin on after each call into our side's
timing: on a loaded machine compare --threads 1, and OMP_WAIT_POLICY=PASSIVE in
the environment (docs/benchmarks.md has both).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # openflamingo_ref: OpenFlamingo built locally
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

FIXTURE = os.path.join(REPO, "tests", "fixtures", "openflamingo_tiny")
WORDS = ("red blue green small big circle square triangle dog cat bus car tree house boat "
         "bird man woman table chair bed street field water sky road sign train plane").split()


def build(root: str, num_classes: int, queries: int):
  """The OpenFlamingo model, our converted model directory, and the benchmark files."""
  import tokenizers
  import torch
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  import openflamingo_ref as ref
  from flamingo_jax.convert.__main__ import main as convert
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(WORDS, 8)) for _ in range(400)]
  raw = tokenizers.Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  raw.post_processor = processors.ByteLevel(trim_offsets=False)
  base_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
  base_tok.save_pretrained(os.path.join(root, "base_tokenizer"))
  n = len(base_tok)
  torch.manual_seed(0)
  lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=n, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
      initializer_range=0.05)).eval()
  lm.save_pretrained(os.path.join(root, "lm"), safe_serialization=True)
  model, eoc, media = ref.build_openflamingo(lm, tokenizer_len=n, decoder_layers="model.layers",
                                             every=2, vis_dim=32)
  # open_flamingo 2.0.1 predates transformers 5, whose generate() calls the LM without
  # an attention mask: give FlamingoLMMixin.forward's mask a default (the left padding
  # of OpenFlamingo's generations is then unmasked: the same work, so only times count).
  cls = type(model.lang_encoder)
  wrapped = cls.forward
  cls.forward = lambda self, input_ids=None, attention_mask=None, **kw: wrapped(
      self, input_ids, attention_mask, **kw)
  ckpt = ref.save(ref.train_script_state_dict(model), os.path.join(root, "checkpoint.pt"),
                  wrapped=True)
  convert(["openflamingo", "--checkpoint", ckpt, "--lm", os.path.join(root, "lm"),
           "--vision", os.path.join(FIXTURE, "vision.safetensors"),
           "--cross_attn_every_n_layers", "2", "--tokenizer", os.path.join(root, "base_tokenizer"),
           "--out", os.path.join(root, "model")])
  # OpenFlamingo's tokenizer, as its factory makes it (what the converter wrote).
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(root, "model", "tokenizer.json"), eos_token="<|endoftext|>",
      pad_token="<PAD>")
  tok.padding_side = "left"
  images = os.path.join(root, "images")
  os.makedirs(images)
  count = queries + 64
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        os.path.join(images, f"{i}.png"))
  karpathy = {"images": [{"filename": f"{i}.png", "imgid": i,
                          "split": "test" if i < queries else "train",
                          "sentences": [{"raw": " ".join(rng.choice(WORDS, 5))}
                                        for _ in range(2)]} for i in range(count)]}
  with open(os.path.join(root, "karpathy.json"), "w") as f:
    json.dump(karpathy, f)
  names = sorted({" ".join(rng.choice(WORDS, int(rng.integers(1, 4)))) for _ in
                  range(num_classes * 3)})[:num_classes]
  with open(os.path.join(root, "classes.json"), "w") as f:
    json.dump(names, f)
  for split, ids in (("test", range(queries)), ("train", range(queries, count))):
    with open(os.path.join(root, f"cls_{split}.json"), "w") as f:
      json.dump([{"image": f"{i}.png", "label": int(rng.integers(0, len(names)))} for i in ids],
                f)
  return model, tok, eoc, media, names


def eval_section(root: str, feature_cache: str = "") -> dict:
  return {"batch_size": 8, "num_beams": 3, "decode_method": "beam", "option_chunk": 64,
          "feature_cache": feature_cache,
          "tasks": {
              "coco": {"kind": "captioning", "train": f"{root}/karpathy.json",
                       "train_splits": ("train",), "image_root": f"{root}/images",
                       "prompt_style": "open_flamingo", "max_new_tokens": 20},
              "imagenet": {"kind": "classification", "format": "list",
                           "train": f"{root}/cls_train.json", "test": f"{root}/cls_test.json",
                           "class_names": f"{root}/classes.json", "image_root": f"{root}/images",
                           "prompt_style": "open_flamingo"}}}


def run_ours(m, ec, task: str, out: str, code=None) -> float:
  """One `run.evaluate`; code: (Generator, Scorer) to run it with (`--before`)."""
  from flamingo_jax.evaluate import decode, features, run, scoring
  run.Generator, run.Scorer = code or (decode.Generator, scoring.Scorer)
  # code from before the latent cache takes the features
  run.latents_supported = (lambda config: False) if code else features.latents_supported
  t0 = time.perf_counter()
  run.evaluate(m.config, ec, m.params, m.tokenizer, tasks=[task], shots=[4], out_dir=out,
                  progress=False, model_id="bench")
  return time.perf_counter() - t0


def code_at(rev: str):
  """(Generator, Scorer, DEFAULT_BUCKETS) of evaluate/decode.py and scoring.py at git
  revision `rev`, imported beside today's: our side before a change, in the same run."""
  import importlib.util
  import subprocess
  mods = {}
  for name in ("decode", "scoring"):
    try:
      src = subprocess.run(["git", "-C", REPO, "show", f"{rev}:flamingo_jax/evaluate/{name}.py"],
                           check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
      sys.exit(f"error: --before {rev}: cannot read flamingo_jax/evaluate/{name}.py there ({e})")
    path = os.path.join(tempfile.mkdtemp(prefix="eval_speed_before_"), f"{name}_{rev}.py")
    with open(path, "w") as f:
      f.write(src)
    spec = importlib.util.spec_from_file_location(f"_before_{name}", path)
    mods[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mods[name])
  return mods["decode"].Generator, mods["scoring"].Scorer, mods["decode"].DEFAULT_BUCKETS


class OpenFlamingoSide:
  """OpenFlamingo's model driven as its evaluate.py / EvalModel drive it."""

  def __init__(self, model, tok, eoc, media, m, ec, task_name):
    from flamingo_jax.evaluate.features import FeatureCache
    from flamingo_jax.evaluate.run import Task
    self.model, self.tok, self.eoc = model, tok, eoc
    self.task = Task(task_name, ec.tasks[task_name], ec, m.config)
    self.task.reseed(ec.seed)
    self.queries = np.arange(len(self.task.test))
    self.shots = self.task.shots(self.queries, 4, False)
    cache = FeatureCache(m.params, m.config, self.task.image, batch_size=8)
    self.features = {ex.image_path: f for ex in self.task.support + self.task.test
                     for f in cache.get([ex.image_path])}

  def _batch(self, batch, query_text):
    """Prompts as OpenFlamingo's evaluate.py joins them: each shot + "\\n", then the query."""
    import torch
    texts, vision = [], []
    for q in batch:
      shots = [self.task.support[i] for i in self.shots[q]]
      texts.append("".join(query_text(s) + "\n" for s in shots) + query_text(None))
      paths = [s.image_path for s in shots] + [self.task.test[q].image_path]
      vision.append(np.stack([self.features[p][0] for p in paths]))  # [N, S, C]
    enc = self.tok(texts, return_tensors="pt", padding="longest")
    vision_x = torch.from_numpy(np.stack(vision))[:, :, None, :, :, None]
    return vision_x, enc["input_ids"], enc["attention_mask"]

  def captioning(self) -> float:
    import torch

    def text(ex):
      return "<image>Output:" + ("" if ex is None else ex.captions[0].strip() + "<|endofchunk|>")
    t0 = time.perf_counter()
    with torch.inference_mode():
      for b in range(0, len(self.queries), 8):
        vision_x, ids, mask = self._batch(self.queries[b:b + 8], text)
        out = self.model.generate(vision_x, ids, attention_mask=mask, max_new_tokens=20,
                                  num_beams=3, length_penalty=0.0,
                                  pad_token_id=self.tok.pad_token_id)
        self.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return time.perf_counter() - t0

  def classification(self, names) -> float:
    import torch

    def text(ex):
      return "<image>Output:" + ("" if ex is None else ex.class_name + "<|endofchunk|>")
    t0 = time.perf_counter()
    with torch.inference_mode():
      for b in range(0, len(self.queries), 8):
        vision_x, ids, mask = self._batch(self.queries[b:b + 8], text)
        self.model.cache_media(input_ids=ids, vision_x=vision_x)
        ctx = self.model(vision_x=None, lang_x=ids, attention_mask=mask,
                         clear_conditioned_layers=False, use_cache=True)
        scores = []
        for name in names:
          cls = self.tok(name, add_special_tokens=False, return_tensors="pt")["input_ids"]
          cls = cls.repeat(ids.shape[0], 1)
          out = self.model(vision_x=None, lang_x=cls,
                           attention_mask=torch.cat([mask, torch.ones_like(cls)], 1),
                           clear_conditioned_layers=False, past_key_values=ctx.past_key_values,
                           use_cache=True)
          ctx.past_key_values.crop(-cls.shape[1])  # back to the prompt for the next name
          logp = torch.log_softmax(torch.cat([ctx.logits, out.logits], 1), -1)
          picked = logp[:, -cls.shape[1] - 1:-1].gather(2, cls[:, :, None])[..., 0]
          scores.append(picked.mean(1))
        torch.stack(scores, 1).argsort(1, descending=True)[:, :5]
        self.model.uncache_media()
    return time.perf_counter() - t0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--queries", type=int, default=16)
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--only", default="captioning,classification")
  p.add_argument("--threads", type=int, default=0, help="threads per side (0: all cores)")
  p.add_argument("--before", default="", help="also time our side with evaluate/decode.py and "
                 "scoring.py (and their prompt buckets) at this git revision")
  p.add_argument("--warm_cache", action="store_true", help="our runs share one feature / "
                 "latent cache directory (a sweep's later shot counts and trials)")
  a = p.parse_args(argv)
  cpus = sorted(os.sched_getaffinity(0))
  if not 0 <= a.threads <= len(cpus):
    p.error(f"--threads must be between 1 and the {len(cpus)} CPUs this process may use")
  cpus = cpus[:a.threads or len(cpus)]
  os.sched_setaffinity(0, cpus)  # before XLA starts: its pool has len(cpus) threads
  import torch
  torch.set_num_threads(len(cpus))
  from flamingo_jax import model_dir
  from flamingo_jax.evaluate.config import eval_config
  root = tempfile.mkdtemp(prefix="eval_speed_")
  model, tok, eoc, media, names = build(root, a.classes, a.queries)
  m = model_dir.load(os.path.join(root, "model"))
  shared = os.path.join(root, "feature_cache") if a.warm_cache else ""
  ec = eval_config(eval_section(root, shared))
  before = code_at(a.before) if a.before else None
  if before:
    ec_before = eval_config(dict(eval_section(root, shared), prompt_buckets=before[2]))
  out = {"queries": a.queries, "classes": len(names), "shots": 4, "batch": 8,
         "cpus": cpus, "torch_threads": torch.get_num_threads(),
         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "warm_cache": a.warm_cache,
         "load_average": os.getloadavg()}
  for kind, task in (("captioning", "coco"), ("classification", "imagenet")):
    if kind not in a.only:
      continue
    of = OpenFlamingoSide(model, tok, eoc, media, m, ec, task)
    of_run = of.captioning if kind == "captioning" else (lambda: of.classification(names))
    runs = iter(range(1000))
    sides = {"ours": lambda: run_ours(m, ec, task, os.path.join(root, f"out_{next(runs)}")),
             "open_flamingo": of_run}
    if before:
      sides["ours_before"] = lambda: run_ours(m, ec_before, task, os.path.join(
          root, f"out_{next(runs)}"), before[:2])
    warm = {k: run() for k, run in sides.items()}  # compilation, first calls
    times = {k: [] for k in sides}
    for _ in range(a.repeats):  # alternating sides
      for k, run in sides.items():
        times[k].append(run())
    per = {k: statistics.median(v) / a.queries for k, v in times.items()}
    out[kind] = {"s_per_example": per, "first_run_s": warm, "runs_s": times,
                 "speedup_ours": per["open_flamingo"] / per["ours"]}
    if before:
      out[kind]["speedup_ours_before"] = per["open_flamingo"] / per["ours_before"]
    print(json.dumps({kind: out[kind]}), file=sys.stderr, flush=True)  # as each finishes
  out["load_average_after"] = os.getloadavg()
  print(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
