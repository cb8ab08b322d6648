"""Labeling data: examples (a word in its text, and whether a feature fires on it) and features.

Synthetic features with known answers validate the labeler; activation records bring in real SAE
features (``features.convert`` writes them from delphi, Neuronpedia, OpenAI and SAELens data).
"""

from tokenspace_jax.features.example import Example, Feature, FeatureError, FeatureFileNotFoundError
from tokenspace_jax.features.records import load_records
from tokenspace_jax.features.synthetic import (
  NEGATIVE_MODES,
  SYNTHETIC_FEATURES,
  load_synthetic_feature,
)

__all__ = ['NEGATIVE_MODES', 'SYNTHETIC_FEATURES', 'Example', 'Feature',
           'FeatureError', 'FeatureFileNotFoundError', 'load_records', 'load_synthetic_feature']
