"""Balanced mini-batches that are a pure function of ``(seed, step)``.

Real features are rare (a few positives among thousands of tokens), so uniform batches would
teach a labeler that "no" is always right; a fixed positive share fixes that. Making every batch a
pure function of the step means a run resumed from a checkpoint at step N sees exactly the batches
an uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokenspace_jax.features.example import Example, FeatureError

# Distinct stream ids, so the positive, negative and natural pools never share a permutation.
_POSITIVE, _NEGATIVE, _NATURAL, _SHUFFLE = 0, 1, 2, 3


class _Stream:
  """An endless concatenation of per-epoch permutations of one pool.

  Reading items ``[a, b)`` of the stream is random access, which is what makes a batch depend on
  its step alone; within an epoch no item repeats, so small pools are still covered evenly.
  """

  def __init__(self, items: Sequence[Example], seed: int, stream_id: int):
    self._items = tuple(items)
    self._seed = seed
    self._stream_id = stream_id
    self._cache: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is None:
      rng = np.random.default_rng([self._seed, self._stream_id, epoch])
      perm = rng.permutation(len(self._items))
      if len(self._cache) >= 4:  # Batches walk forward; a few recent epochs is all that is reused.
        self._cache.pop(next(iter(self._cache)))
      self._cache[epoch] = perm
    return perm

  def take(self, begin: int, count: int) -> list[Example]:
    n = len(self._items)
    out = []
    for pos in range(begin, begin + count):
      epoch, idx = divmod(pos, n)
      out.append(self._items[int(self._permutation(epoch)[idx])])
    return out


class BalancedSampler:
  """Batches with ``round(batch_size * positive_fraction)`` positives, the rest negatives.

  ``positive_fraction=None`` samples uniformly from all examples instead (the natural, usually
  very unbalanced, distribution), which is what an evaluation of real-world precision wants.
  """

  def __init__(self, examples: Sequence[Example], batch_size: int,
               positive_fraction: float | None = 0.5, seed: int = 0):
    if not isinstance(batch_size, int) or batch_size < 1:
      raise FeatureError(f'batch_size must be a positive integer, got {batch_size!r}; '
                         'pass e.g. batch_size=16.')
    if not isinstance(seed, int) or seed < 0:
      raise FeatureError(f'seed must be a non-negative integer, got {seed!r}; pass e.g. seed=0.')
    if not examples:
      raise FeatureError('BalancedSampler got no examples; pass the train (or heldout) examples '
                         'of a feature, e.g. feature.train.')
    self.batch_size = batch_size
    self.positive_fraction = positive_fraction
    self.seed = seed
    positives = [ex for ex in examples if ex.target > 0.5]
    negatives = [ex for ex in examples if ex.target <= 0.5]
    self.num_positives, self.num_negatives = len(positives), len(negatives)

    if positive_fraction is None:
      self._n_pos, self._n_neg = 0, batch_size
      self._streams = (None, _Stream(examples, seed, _NATURAL))
      return
    if not 0.0 <= positive_fraction <= 1.0:
      raise FeatureError(f'positive_fraction must be in [0, 1] or None, got {positive_fraction!r};'
                         ' use 0.5 for balanced batches or None for the natural distribution.')
    self._n_pos = round(batch_size * positive_fraction)
    self._n_neg = batch_size - self._n_pos
    if self._n_pos and not positives:
      raise FeatureError(
          f'Cannot put {self._n_pos} positives in each batch: none of the {len(examples)} examples '
          'is positive (target 1). Lower the threshold that defines positives, check the data, '
          'or pass positive_fraction=None to sample the natural distribution.')
    if self._n_neg and not negatives:
      raise FeatureError(
          f'Cannot put {self._n_neg} negatives in each batch: all {len(examples)} examples are '
          'positive (target 1). Raise the threshold that defines positives, add negatives, '
          'or pass positive_fraction=None to sample the natural distribution.')
    self._streams = (_Stream(positives, seed, _POSITIVE) if positives else None,
                     _Stream(negatives, seed, _NEGATIVE) if negatives else None)

  def batch(self, step: int) -> list[Example]:
    """The batch for ``step``; the same on every call and in every process."""
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise FeatureError(f'step must be a non-negative integer, got {step!r}.')
    step = int(step)
    pos_stream, neg_stream = self._streams
    out: list[Example] = []
    if self._n_pos:
      out += pos_stream.take(step * self._n_pos, self._n_pos)
    if self._n_neg:
      out += neg_stream.take(step * self._n_neg, self._n_neg)
    # Shuffled so position in the batch says nothing about the target.
    order = np.random.default_rng([self.seed, _SHUFFLE, step]).permutation(len(out))
    return [out[int(i)] for i in order]
