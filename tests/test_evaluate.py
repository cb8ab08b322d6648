"""Scores and the verdict: intervals that cover, and a verdict that says when it cannot tell."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tokenspace_jax.engine import scoring
from tokenspace_jax.engine.scoring import LabelScore, auroc, verdict


def _margins(rng, targets, separations):
  """Margins of one label per separation: positives shifted up by it (0: a random label).

  As with a real classifier, most of an example's margin is the same whatever the label (the
  word itself, the text): labels are compared on the same examples, so their differences are
  much surer than each AUROC alone.
  """
  common = rng.normal(size=len(targets))
  return np.stack([common + 0.5 * rng.normal(size=len(targets)) + s * targets
                   for s in separations])


def _scores(margins, targets, roles):
  return [LabelScore(i, f't{i}', role, auroc(m, targets), None, 0.5, 0.5, 0.5, {}, 0.0)
          for i, (m, role) in enumerate(zip(margins, roles, strict=True))]


ROLES = ['found', 'reference', 'random', 'random', 'random']


def _verdict(n, separations, seed=0):
  rng = np.random.default_rng(seed)
  targets = (np.arange(n) % 2).astype(np.float32)
  margins = _margins(rng, targets, separations)
  samples = scoring.bootstrap_aurocs(margins, targets, 500, seed)
  positives = int(targets.sum())
  return verdict(_scores(margins, targets, ROLES), samples, positives=positives,
                 negatives=n - positives)


def test_bootstrap_counts_equal_resampled_aurocs():
  """The pair-count shortcut is the AUROC of the resampled examples, computed directly."""
  rng = np.random.default_rng(0)
  targets = np.array([1, 0, 1, 1, 0, 0, 0, 1, 0, 1], np.float32)
  margins = np.round(rng.normal(size=(2, 10)), 1)  # ties included
  got = scoring.bootstrap_aurocs(margins, targets, 5, seed=3)
  # The same resamples, redrawn as scoring draws them: positives first, then negatives.
  again = np.random.default_rng(3)
  pos, neg = np.flatnonzero(targets > 0.5), np.flatnonzero(targets <= 0.5)
  cp = [again.integers(0, len(pos), len(pos)) for _ in range(5)]
  cn = [again.integers(0, len(neg), len(neg)) for _ in range(5)]
  for b in range(5):
    idx = np.concatenate([pos[cp[b]], neg[cn[b]]])
    for label in range(2):
      assert got[label, b] == pytest.approx(auroc(margins[label, idx], targets[idx]))


def test_a_clear_label_with_enough_examples_is_identifiable():
  v = _verdict(400, [0.8, 0.6, 0, 0, 0])
  assert v['status'] == scoring.IDENTIFIABLE and v['identifiable']
  lo, hi = v['label_dependence_interval']
  assert 0 < lo < v['label_dependence'] < hi
  assert v['found_vs_reference'] in ('beats', 'matches')


def test_a_label_no_better_than_random_tokens_is_not_identifiable():
  v = _verdict(400, [0, 0, 0, 0, 0])
  assert v['status'] == scoring.NOT_IDENTIFIABLE and not v['identifiable']
  assert 'do not depend on the label' in v['message']


def test_too_few_heldout_examples_give_undetermined_not_a_false_negative():
  """A weak label on 40 held-out examples: the intervals are too wide to decide either way. Any
  label on 12 (6 positives): too few for an interval to mean anything. Both say so."""
  v = _verdict(40, [0.3, 0.2, 0, 0, 0])
  assert v['status'] == scoring.UNDETERMINED and not v['identifiable']
  lo, hi = v['label_dependence_interval']
  assert lo < 0 < v['margin'] < hi
  for separations in ([0.8, 0.6, 0, 0, 0], [0, 0, 0, 0, 0]):
    v = _verdict(12, separations, seed=1)
    assert v['status'] == scoring.UNDETERMINED
    assert 'UNDETERMINED' in v['message'] and '6 positives' in v['message']


def test_without_intervals_the_point_estimates_decide():
  rng = np.random.default_rng(0)
  targets = (np.arange(400) % 2).astype(np.float32)
  margins = _margins(rng, targets, [0.8, 0.6, 0, 0, 0])
  assert verdict(_scores(margins, targets, ROLES))['identifiable']


def test_auroc_counts_ties_half():
  targets = np.array([1, 1, 0, 0])
  assert auroc(np.array([3.0, 1.0, 1.0, 0.0]), targets) == 0.875
  assert auroc(np.array([0.0, 0.0, 0.0, 0.0]), targets) == 0.5


def test_window_detection_and_correlation():
  """A window is positive when any of its tokens is; its score is its largest margin."""
  split = scoring.Split(slots=np.arange(6), targets=np.array([0, 1, 0, 0, 0, 0], np.float32),
                        windows=np.array([0, 0, 1, 1, 2, 2]),
                        activations=np.array([0.0, 3.0, 0.0, 0.1, 0.0, 0.0]))
  best, positive = scoring.window_max(np.array([-1.0, 2.0, 0.5, -3.0, 0.0, 0.1]), split)
  np.testing.assert_array_equal(best, [2.0, 0.5, 0.1])
  np.testing.assert_array_equal(positive, [1, 0, 0])
  d = scoring.detection(np.array([-1.0, 2.0, 0.5, -3.0, 0.0, 0.1]), split,
                        np.array([-1.0, 2.0, 0.5, -3.0, 0.0, 0.1]), split)
  assert d['auroc'] == 1.0 and d['f1'] == 1.0 and d['windows'] == 3
  assert d['positive_windows'] == 1
  assert scoring.pearson(np.array([0, 1, 2.0]), np.array([0, 2, 4.0])) == pytest.approx(1.0)


def test_a_found_label_that_beats_a_reference_the_classifier_ignores_comes_with_a_caution():
  """The found label separates the classes, the reference word no better than random labels:
  identifiable, but the reader is told the classifier hardly uses the concept."""
  v = _verdict(400, [0.8, 0, 0, 0, 0])
  assert v['status'] == scoring.IDENTIFIABLE and v['found_vs_reference'] == 'beats'
  assert not v['reference_uses_concept'] and 'Caution' in v['message']
  assert v['message'].startswith('IDENTIFIABLE, WITH A CAUTION:') and v['caution']
  plain = _verdict(400, [0.8, 0.6, 0, 0, 0])
  assert 'Caution' not in plain['message'] and 'caution' not in plain
  assert plain['message'].startswith('IDENTIFIABLE: ')


def test_another_word_that_only_matches_an_ignored_reference_also_comes_with_a_caution():
  """"Matches" by a wide interval is no evidence that the words mean the same: when the
  reference hardly beats random labels, any other found word is cautioned; the reference word
  itself, found, is not."""
  rng = np.random.default_rng(4)
  n = 400
  targets = (np.arange(n) % 2).astype(np.float32)
  # Independent margins (no shared part), so the difference of the two words is unsure.
  margins = rng.normal(size=(8, n)) + np.array([0.35, 0.12] + [0] * 6)[:, None] * targets
  samples = scoring.bootstrap_aurocs(margins, targets, 500, 4)
  roles = ['found', 'reference'] + ['random'] * 6
  v = verdict(_scores(margins, targets, roles), samples, positives=n // 2, negatives=n // 2)
  assert v['status'] == scoring.IDENTIFIABLE and v['found_vs_reference'] == 'matches'
  assert not v['reference_uses_concept']
  assert v['message'].startswith('IDENTIFIABLE, WITH A CAUTION:') and v['caution']
  same = _scores(margins, targets, roles)
  same[0] = dataclasses.replace(same[0], token_id=same[1].token_id, token=same[1].token)
  itself = verdict(same, samples, positives=n // 2, negatives=n // 2)
  assert 'caution' not in itself and itself['message'].startswith('IDENTIFIABLE: ')


def test_a_reference_that_clears_zero_but_not_the_margin_still_brings_the_caution():
  """The classifier uses the concept only when the reference beats the random labels by the
  margin at the low end of its interval; a lower end just above zero is no such evidence."""
  rng = np.random.default_rng(0)
  resamples = 2000
  def scores_and_samples(ref_gain, spread):
    means = {'found': 0.72, 'reference': 0.5 + ref_gain, 'random': 0.5}
    roles = ['found', 'reference'] + ['random'] * 6
    samples = np.stack([means[r] + spread * rng.normal(size=resamples) for r in roles])
    scores = [LabelScore(i, f't{i}', role, float(samples[i].mean()), None, 0.5, 0.5, 0.5, {},
                         0.0) for i, role in enumerate(roles)]
    return verdict(scores, samples, positives=64, negatives=64)
  edge = scores_and_samples(0.12, 0.04)
  low, high = edge['reference_dependence_interval']
  assert 0 < low < edge['margin'] < edge['reference_dependence']  # the case this is about
  assert edge['status'] == scoring.IDENTIFIABLE and not edge['reference_uses_concept']
  assert edge['message'].startswith('IDENTIFIABLE, WITH A CAUTION:')
  clear = scores_and_samples(0.25, 0.04)
  assert clear['reference_dependence_interval'][0] > clear['margin']
  assert clear['reference_uses_concept'] and 'caution' not in clear


def test_random_labels_are_word_like_and_as_many_as_asked():
  class Tok:
    def decode(self, ids):
      return {0: ' cat', 1: '##', 2: ' dog', 3: 'x', 4: ' tree'}[ids[0]]
  allowed = np.ones(5, bool)
  assert scoring.random_label_tokens(allowed, Tok(), 0, seed=0) == []
  two = scoring.random_label_tokens(allowed, Tok(), 2, seed=0)
  assert len(two) == 2 and set(two) <= {0, 2, 4}


def test_the_random_mean_interval_counts_which_random_labels_were_drawn():
  """Random labels that disagree widely widen the interval of their mean, even where every
  label's own AUROC is certain (identical in every example resample)."""
  from tokenspace_jax.engine.scoring import random_means

  same = np.full((5, 400), 0.6)
  np.testing.assert_allclose(random_means(same), 0.6)
  spread = np.repeat(np.array([[0.25], [0.45], [0.5], [0.55], [0.75]]), 400, axis=1)
  means = random_means(spread)
  assert abs(means.mean() - 0.5) < 0.02 and means.std() > 0.05
