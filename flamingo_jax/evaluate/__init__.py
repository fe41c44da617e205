"""Evaluation: metrics, prompts, shot selection and dataset readers.

Everything here is model-independent (NumPy and the standard library), so
scores can be recomputed from saved predictions and tested against the
reference implementations without a model. docs/evaluation.md describes the
protocol, the file layouts and the metric definitions.
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
