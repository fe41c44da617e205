"""Input pipelines for Flamingo: grain datasets of pairs, interleaved documents, videos.

The public API the trainer and evaluators use; see docs/data.md.

  mixture = make_mixture(config)          # config.data: a DataConfig/ConfigDict
  batches = next(mixture)                 # {dataset name: batch dict [B, ...]}
  state = iterator_states(mixture)        # JSON-serialisable, for orbax
  restore_iterator_states(mixture, state)
  mixture.stats()                         # bad-data counters per dataset

The trainer's view of the same thing: make_train_iterators(config, rows)
gives {name: iterator} feeding this process's rows of each global batch.
"""
from flamingo_jax.data.accounting import SkipRateError
from flamingo_jax.data.config import (DataConfig, DatasetConfig, ImageConfig, data_config,
                                      dataset_config)
from flamingo_jax.data.pipeline import (Mixture, iterator_states, make_dataset, make_mixture,
                                        make_train_iterators, restore_iterator_states,
                                        shard_info)
from flamingo_jax.data.records import SKIP_REASONS
from flamingo_jax.data.tokenizer import Tokenizer, TokenizerInfo
from flamingo_jax.data.transforms import example_spec

__all__ = [
    "DataConfig", "DatasetConfig", "ImageConfig", "Mixture", "SKIP_REASONS", "SkipRateError",
    "Tokenizer", "TokenizerInfo", "data_config", "dataset_config", "example_spec",
    "iterator_states", "make_dataset", "make_mixture", "make_train_iterators",
    "restore_iterator_states", "shard_info",
]
