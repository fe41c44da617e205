"""Evaluation: metrics, prompts, shot selection and dataset readers; decoding,
scoring and the evaluation run.

The metrics, prompts, shot selection and readers are model-independent (NumPy
and the standard library), so scores can be recomputed from saved predictions
and tested against the reference implementations without a model. The
model side imports JAX, so its names below load on first use: `decode`,
`scoring`, the eval schema (`config`), the inputs (`inputs`), the run and its
reports (`run`) and the CLI (`cli`, run by `__main__`). docs/evaluation.md
describes the protocol, the file layouts, the metric definitions, decoding and
the CLI.
"""
from flamingo_jax.evaluate.cider import (CiderScores, cider_d, coco_tokenize,
                                         ptb_tokenize)
from flamingo_jax.evaluate.classification import (option_scores, positive_probability,
                                                  rank_options, roc_auc, top_k_accuracy)
from flamingo_jax.evaluate.datasets import (HATEFUL_MEMES_CLASS_NAMES, VQA_IMAGE_NAMING,
                                            CaptionExample, ClassificationExample,
                                            HatefulMemesExample, VQAExample,
                                            read_class_names, read_classification_list,
                                            read_hateful_memes, read_image_folder,
                                            read_karpathy_captions, read_vqa)
from flamingo_jax.evaluate.prompts import (EOC_MARKER, IMAGE_MARKER, Prompt,
                                           PromptTemplate, build_prompt, ensemble_prompts,
                                           get_template, num_demonstrations,
                                           postprocess_generation, random_query_set,
                                           random_shots, shot_orders)
from flamingo_jax.evaluate.rices import rices_shots
from flamingo_jax.evaluate.vqa import (VQAScores, normalize_answer, question_accuracy,
                                       vqa_accuracy)

# Model-side names, imported on first use (they need JAX; the rest does not).
_LAZY = {
    "DecodeConfig": "decode", "Generation": "decode", "Generator": "decode",
    "generate": "decode", "filter_logits": "decode", "left_pad": "decode",
    "Scorer": "scoring", "option_logprobs": "scoring", "encode_prompts": "scoring",
    "continuation_logprobs": "scoring",
    "EvalConfig": "config", "EvalTaskConfig": "config", "eval_config": "config",
    "load_image": "inputs", "encode_prompt": "inputs",
    "evaluate": "run", "results_markdown": "run",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
