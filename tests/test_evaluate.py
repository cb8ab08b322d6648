"""The identifiability verdict: a label counts only if it beats random tokens and chance."""

from __future__ import annotations

import numpy as np

from tokenspace_jax.engine.scoring import LabelScore, auroc, verdict


def _scores(found, reference, randoms):
  make = lambda a, role, i: LabelScore(i, f't{i}', role, a, 0.5, 0.5, 0.5)
  return ([make(found, 'found', 0), make(reference, 'reference', 1)]
          + [make(a, 'random', 2 + i) for i, a in enumerate(randoms)])


def test_a_label_that_beats_random_tokens_and_chance_is_identifiable():
  v = verdict(_scores(0.75, 0.70, [0.55, 0.58, 0.52]))
  assert v['identifiable'] and v['found_matches_reference']


def test_a_label_no_better_than_random_tokens_is_not():
  v = verdict(_scores(0.64, 0.62, [0.61, 0.63, 0.60]))
  assert not v['identifiable'] and 'whatever the label' in v['message']


def test_a_label_at_chance_is_not_even_when_random_tokens_score_below_it():
  v = verdict(_scores(0.48, 0.50, [0.36, 0.43, 0.41]))
  assert v['label_dependence'] > 0.05 and not v['identifiable']
  assert 'near chance' in v['message']


def test_auroc_counts_ties_half():
  targets = np.array([1, 1, 0, 0])
  assert auroc(np.array([3.0, 1.0, 1.0, 0.0]), targets) == 0.875
  assert auroc(np.array([0.0, 0.0, 0.0, 0.0]), targets) == 0.5
