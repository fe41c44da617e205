"""A readable run: off a terminal the demo's stages and evaluation print one line per
tenth of the work (not a bar redraw per step), and a baseline's lines say so."""
import dataclasses
import io
import logging
import os

import pytest

from flamingo_jax.training.metrics import Progress
from eval_files import CAPTIONS, EVAL, make_coco


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_off_a_terminal_progress_writes_a_line_per_tenth():
  out = io.StringIO()
  bar = Progress("flamingo training", 1000, file=out)
  for step in range(1, 1001):
    bar.set(step, loss=f"{1 / step:.3f}")
  bar.close()
  bar.close()  # closing twice adds nothing
  lines = out.getvalue().splitlines()
  assert len(lines) == 10, lines
  assert lines[0].startswith("flamingo training: 100/1000 steps | loss 0.010")
  assert lines[-1].startswith("flamingo training: 1000/1000 steps | loss 0.001")
  assert "\r" not in out.getvalue()


def test_progress_resumed_and_stopped_early_ends_with_its_last_count():
  out = io.StringIO()
  bar = Progress("eval", 40, initial=20, unit="example", file=out, lines=4)
  for _ in range(13):
    bar.update(1)
  bar.close()
  lines = out.getvalue().splitlines()
  assert [line.split()[:3] for line in lines] == [["eval:", "30/40", "examples"],
                                                 ["eval:", "33/40", "examples"]], lines


def test_on_a_terminal_progress_is_a_tqdm_bar():
  out = _Tty()
  bar = Progress("lm pretraining", 50, file=out)
  for step in range(1, 51):
    bar.set(step)
  bar.close()
  assert "\r" in out.getvalue() and "50/50" in out.getvalue()


@pytest.mark.slow  # ~65 s here: the demo's data stage, then 40 LM steps
def test_demo_lm_stage_off_a_terminal_prints_few_lines(tmp_path, capsys):
  from flamingo_jax.apps.demo import stages as demo
  scale = dataclasses.replace(demo.SCALES["smoke"], lm_steps=40)
  demo.run(str(tmp_path), scale, stages=("data", "lm"))
  err = capsys.readouterr().err.splitlines()
  lm = [line for line in err if line.startswith("lm pretraining:")]
  assert [line.split()[2] for line in lm] == [f"{4 * k}/40" for k in range(1, 11)], lm
  assert all("loss" in line for line in lm)


@pytest.mark.slow  # ~30 s here: tokenizer, tiny model, one compiled decoder
def test_evaluation_lines_carry_the_label(tmp_path, capsys, caplog):
  from flamingo_jax.config import load_config
  from flamingo_jax.models.config import model_config
  from flamingo_jax.data.train_tokenizer import train_tokenizer
  from flamingo_jax.apps.demo.stages import EVAL_LABELS
  from flamingo_jax.evaluate.config import compose, eval_config
  from flamingo_jax.evaluate.run import evaluate
  from flamingo_jax.model_dir import init_params
  make_coco(str(tmp_path / "coco"))
  (tmp_path / "corpus.txt").write_text("\n".join(f"Output: {c}" for c in CAPTIONS * 3))
  tok = train_tokenizer([str(tmp_path / "corpus.txt")], 96, str(tmp_path / "tok"),
                        model_type="bpe")
  tiny = load_config(os.path.join(os.path.dirname(EVAL), "tiny.py"))
  tiny.model.image_token_id = tok.info.image_token_id
  tiny.model.eoc_token_id = tok.info.eoc_token_id
  config = model_config(tiny)
  cfg, tasks = compose(eval_files=[f"{EVAL}/coco.py:{tmp_path / 'coco'}"],
                       overrides=["eval.decode_method='greedy'", "eval.batch_size=2",
                                  "eval.tasks.coco.max_new_tokens=3"])
  label = EVAL_LABELS["gates_zero"]
  with caplog.at_level(logging.INFO, logger="flamingo_jax.evaluate.run"):
    evaluate(config, eval_config(cfg), init_params(config, seed=1), tok, tasks=tasks,
             shots=[0], num_samples=2, label=label)
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert err and all(line.startswith(label + "coco 0-shot: ") for line in err), err
  scores = [r.getMessage() for r in caplog.records if "0-shot trial" in r.getMessage()]
  assert scores and all(m.startswith(label + "coco 0-shot trial 0") for m in scores), scores
