"""The feature a config names: a built-in one, or the records file of ``feature.records``."""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from tokenspace_jax.features.example import Feature, FeatureError
from tokenspace_jax.features.records import load_records
from tokenspace_jax.features.synthetic import SYNTHETIC_FEATURES, load_synthetic_feature


def load_feature(cfg: ConfigDict, tokenizer, vocab_size: int | None = None) -> Feature:
  """The feature of ``config.feature``, aligned to ``tokenizer`` (ids checked against
  ``vocab_size``)."""
  if cfg.records:
    return load_records(cfg.records, tokenizer, threshold=cfg.threshold,
                        reference_word=cfg.reference_word, seed=cfg.split_seed,
                        heldout_fraction=cfg.heldout_fraction, window=cfg.window,
                        vocab_size=vocab_size)
  if cfg.name not in SYNTHETIC_FEATURES:
    raise FeatureError(f'Unknown feature {cfg.name!r}. Built-in features: '
                       f'{", ".join(SYNTHETIC_FEATURES)}; or set feature.records to an '
                       'activation-records .jsonl file.')
  feature = load_synthetic_feature(cfg.name, negatives=cfg.negatives)
  if cfg.reference_word:
    feature = dataclasses.replace(feature, reference_word=cfg.reference_word)
  return feature
