"""The one batch sampler: balanced, deterministic, every epoch covered once."""

from __future__ import annotations

import numpy as np
import pytest

from tokenspace_jax.engine.sampler import batch_schedule

POSITIVES, NEGATIVES = np.arange(10), np.arange(10, 60)


@pytest.mark.parametrize('fraction, n_pos', [(0.5, 4), (0.25, 2), (0.3, 2)])
def test_every_batch_holds_its_share_of_positives(fraction, n_pos):
  schedule = batch_schedule(POSITIVES, NEGATIVES, 20, 8, fraction, seed=0)
  assert schedule.shape == (20, 8)
  np.testing.assert_array_equal(np.isin(schedule, POSITIVES).sum(axis=1), n_pos)


def test_a_schedule_is_a_function_of_its_seed():
  a = batch_schedule(POSITIVES, NEGATIVES, 12, 6, 0.5, seed=11)
  np.testing.assert_array_equal(a, batch_schedule(POSITIVES, NEGATIVES, 12, 6, 0.5, seed=11))
  assert not np.array_equal(a, batch_schedule(POSITIVES, NEGATIVES, 12, 6, 0.5, seed=12))


def test_each_epoch_draws_every_example_once():
  schedule = batch_schedule(POSITIVES, NEGATIVES, 5, 4, 0.5, seed=0)
  np.testing.assert_array_equal(np.sort(schedule[:, :2].reshape(-1)), POSITIVES)


def test_natural_sampling_draws_from_all_examples():
  schedule = batch_schedule(POSITIVES, NEGATIVES, 6, 10, None, seed=0)
  np.testing.assert_array_equal(np.sort(schedule.reshape(-1)), np.arange(60))
