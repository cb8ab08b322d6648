"""The one batch sampler: a [steps, batch] schedule of example indices, drawn up front.

Real features are rare (a few positives among thousands of tokens), so uniform batches would
teach a labeler that "no" is always right: a fixed share of each batch is positive. The
schedule is a pure function of the pools and the seed, computed before descent and read on
device by the step, so a run resumed from a checkpoint at step N sees exactly the batches an
uninterrupted run would have seen, with no sampler state to save. Each data shard of a mesh
draws its share of every batch with it from its own examples (``parallel.shard_layout``).
"""

from __future__ import annotations

import numpy as np


def batch_schedule(positives: np.ndarray, negatives: np.ndarray, steps: int, batch_size: int,
                   positive_fraction: float | None, seed: int) -> np.ndarray:
  """[steps, batch] example indices; epochs of shuffled positives and negatives drawn in turn.

  ``positive_fraction=None`` samples from all examples in their natural proportion.
  """
  rng = np.random.default_rng(seed)

  def stream(pool: np.ndarray, count: int) -> np.ndarray:
    if count == 0:
      return np.zeros((0,), np.int64)
    epochs = -(-count // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(epochs)])[:count]

  if positive_fraction is None:
    both = np.concatenate([positives, negatives])
    return stream(both, steps * batch_size).reshape(steps, batch_size).astype(np.int32)
  n_pos = int(round(batch_size * positive_fraction))
  pos = stream(positives, steps * n_pos).reshape(steps, n_pos)
  neg = stream(negatives, steps * (batch_size - n_pos)).reshape(steps, batch_size - n_pos)
  return np.concatenate([pos, neg], axis=1).astype(np.int32)
