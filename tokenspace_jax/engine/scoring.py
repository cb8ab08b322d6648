"""Scoring discrete labels, against baselines, with intervals and an identifiability verdict.

A found label means something only relative to what *any* label achieves: a small model may
separate positives from negatives by the word alone, whatever the concept says. So the found
token, the human reference word and a few random tokens are scored the same way, and the run
says plainly when the label makes no difference, and when there are too few held-out examples
to tell.

Every label is scored in one batched pass: the (label, example) pairs of all labels of one
length fill fixed-size forward passes, so many labels cost what their pairs cost, not one
compilation or one partial batch each.

Accuracy needs a decision threshold on the yes/no margin. It is fitted on training examples
for each label separately (maximising balanced accuracy) and applied to the held-out split, so
no label is favoured by the model's overall yes/no tendency. Intervals are percentile bootstrap
intervals over held-out examples resampled within each class, the same resamples for every
label, so differences between labels (found minus reference, best minus random) get paired
intervals.

Beside the per-example AUROC, the scores users of delphi and OpenAI's automated
interpretability read: window-level detection (a window's largest margin against "the window
holds a positive": AUROC, balanced accuracy, F1) and a simulation-style correlation (Pearson r
between the per-token margin and the raw activation).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.classifier import prefix
from tokenspace_jax.models.llama import Llama

IDENTIFIABILITY_MARGIN = 0.05
# Below this many held-out positives (or negatives) a bootstrap interval is itself unreliable
# (it is too narrow), so no verdict is given.
MIN_HELDOUT_PER_CLASS = 10

IDENTIFIABLE, NOT_IDENTIFIABLE, UNDETERMINED = 'identifiable', 'not identifiable', 'undetermined'


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U), ties counted half."""
  pos, neg = scores[targets > 0.5], scores[targets <= 0.5]
  if len(pos) == 0 or len(neg) == 0:
    return float('nan')
  greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return float(greater / (len(pos) * len(neg)))


def balanced_accuracy(pred: np.ndarray, targets: np.ndarray) -> float:
  t = targets > 0.5
  if not t.any() or t.all():
    return float('nan')
  return float(0.5 * (pred[t].mean() + (~pred[~t]).mean()))


def f1(pred: np.ndarray, targets: np.ndarray) -> float:
  t = targets > 0.5
  tp = float((pred & t).sum())
  denominator = float(pred.sum() + t.sum())
  return 2 * tp / denominator if denominator else float('nan')


def pearson(x: np.ndarray, y: np.ndarray) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2 or x.std() == 0 or y.std() == 0:
    return float('nan')
  return float(np.corrcoef(x, y)[0, 1])


def best_threshold(scores: np.ndarray, targets: np.ndarray) -> float:
  candidates = np.unique(scores)
  mids = np.concatenate([[candidates[0] - 1], (candidates[1:] + candidates[:-1]) / 2,
                         [candidates[-1] + 1]])
  accs = [balanced_accuracy(scores > m, targets) for m in mids]
  return float(mids[int(np.nanargmax(accs))])


def bootstrap_aurocs(margins: np.ndarray, targets: np.ndarray, resamples: int,
                     seed: int) -> np.ndarray:
  """[L, resamples] AUROC of every label's margins [L, n] on the same class-stratified
  resamples of the examples (so differences between labels are paired)."""
  pos, neg = np.flatnonzero(targets > 0.5), np.flatnonzero(targets <= 0.5)
  if resamples == 0 or len(pos) == 0 or len(neg) == 0:
    return np.zeros((len(margins), 0))
  rng = np.random.default_rng(seed)
  # Multinomial counts of each example per resample: AUROC is then a weighted pair count.
  count = lambda n: np.stack([np.bincount(rng.integers(0, n, n), minlength=n)
                              for _ in range(resamples)]).astype(np.float64)
  cp, cn = count(len(pos)), count(len(neg))  # [B, n_pos], [B, n_neg]
  out = np.empty((len(margins), resamples))
  for i, m in enumerate(margins):
    a, b = m[pos], m[neg]
    wins = (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])  # [n_pos, n_neg]
    out[i] = np.einsum('bp,pn,bn->b', cp, wins, cn) / (len(pos) * len(neg))
  return out


def interval(samples: np.ndarray, confidence: float) -> list[float] | None:
  if samples.size == 0:
    return None
  tail = 100 * (1 - confidence) / 2
  lo, hi = np.percentile(samples, [tail, 100 - tail])
  return [float(lo), float(hi)]


@dataclasses.dataclass(frozen=True)
class LabelScore:
  token_id: int | list[int]  # a list for a label of several tokens
  token: str
  role: str  # 'found', 'descent', 'candidate', 'reference', 'random'
  auroc: float
  auroc_interval: list[float] | None
  accuracy: float
  balanced_accuracy: float
  mean_p_yes: float
  detection: dict  # window-level: auroc, balanced_accuracy, f1, windows, positive_windows
  correlation: float  # Pearson r of the margin and the raw activation, over held-out tokens

  def as_dict(self):
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Split:
  """Examples to score on: their slots in the caches, targets, windows and raw activations."""

  slots: np.ndarray
  targets: np.ndarray
  windows: np.ndarray  # an id per example: examples of one text share it
  activations: np.ndarray

  def take(self, idx: np.ndarray) -> Split:
    return Split(self.slots[idx], self.targets[idx], self.windows[idx], self.activations[idx])


def label_key(ids) -> tuple:
  """A label (one id, or a sequence of ids) as a tuple of ints: how labels are looked up."""
  return tuple(int(i) for i in np.atleast_1d(np.asarray(ids)))


class LabelScorer:
  """Yes/no margins of fixed labels (each one token, or a sequence filling a slot of that many
  tokens), for examples given by their slots in the prefix caches.

  ``known`` (label ids -> margins of every slot) holds margins computed before, which are
  returned instead of run: the pool's contrast labels, each against the baseline of the others
  (``engine.pool.contrast_baseline``). Every margin the scorer runs is remembered too, so a
  (label, example) pair runs once: the final choice's finalists are run only on the examples
  its screen did not cover, and the chosen label's calibration margins come from the choice.
  """

  def __init__(self, model: Llama, params, caches: prefix.PrefixCaches, tail_ids, answer_ids,
               full_vocab: bool, rows: int = 32, known: dict | None = None):
    self.model, self.params, self.caches = model, params, caches
    self.tail_ids, self.answer_ids = jnp.asarray(tail_ids), jnp.asarray(answer_ids)
    self.full_vocab, self.rows = full_vocab, rows
    self.known = known or {}
    self._seen: dict[tuple, np.ndarray] = {}  # label ids -> [slots] margins run, NaN where not

  @functools.cached_property
  def _margins(self):
    @jax.jit
    def run(params, caches, slots, label_ids, tail_ids, answer_ids):
      emb = params['embed'][label_ids]  # [rows, K, hidden]: one compilation per label length
      lp = prefix.answer_log_probs(self.model, params, caches.take(slots), emb, tail_ids,
                                   answer_ids, caches.answer_bias(jnp.zeros(()), slots),
                                   self.full_vocab)
      return lp[:, 0] - lp[:, 1]
    return run

  def margins(self, labels: list, slots: np.ndarray) -> np.ndarray:
    """[L, n] log P(yes) - log P(no) of every label (an id or a list of ids) on every slot.

    Only pairs neither known nor run before are run, label-major, in passes of ``rows``."""
    labels = [list(np.atleast_1d(np.asarray(x, np.int64))) for x in labels]
    keys = [label_key(x) for x in labels]
    slots = np.asarray(slots, np.int64)
    out = np.full((len(labels), len(slots)), np.nan, np.float32)
    for i, key in enumerate(keys):
      known = self.known.get(key, self._seen.get(key))
      if known is not None:
        out[i] = known[slots]
    # A known label is never run: its margins are against another baseline (see above).
    missing = np.isnan(out) & np.array([key not in self.known for key in keys], bool)[:, None]
    for k in sorted({len(labels[i]) for i in range(len(labels)) if missing[i].any()}):
      which = np.asarray([i for i in range(len(labels))
                          if len(labels[i]) == k and missing[i].any()])
      ids = np.asarray([labels[i] for i in which], np.int32)  # [L_k, k]
      pair_label, pair_pos = np.nonzero(missing[which])
      pair_slot = slots[pair_pos].astype(np.int32)
      values = np.empty(len(pair_label), np.float32)
      for start in range(0, len(pair_label), self.rows):
        chunk = slice(start, start + self.rows)
        n = len(pair_label[chunk])
        pad = lambda x, n=n: np.pad(x, [(0, self.rows - n)] + [(0, 0)] * (x.ndim - 1),
                                    mode='edge')
        m = self._margins(self.params, self.caches, jnp.asarray(pad(pair_slot[chunk])),
                          jnp.asarray(pad(ids[pair_label[chunk]])), self.tail_ids,
                          self.answer_ids)
        values[chunk] = np.asarray(m)[:n]
      out[which[pair_label], pair_pos] = values
      for j, i in enumerate(which):
        seen = self._seen.setdefault(keys[i], np.full(self.caches.valid.shape[0], np.nan,
                                                      np.float32))
        seen[slots[pair_pos[pair_label == j]]] = values[pair_label == j]
    return out

  def training_aurocs(self, labels: list, split: Split) -> np.ndarray:
    """AUROC of each label on a (training) split: what the final choice ranks by."""
    return np.array([auroc(m, split.targets) for m in self.margins(labels, split.slots)])

  def score(self, labels: list[tuple], calibration: Split, heldout: Split, *,
            resamples: int = 1000, confidence: float = 0.95,
            seed: int = 0) -> tuple[list[LabelScore], np.ndarray]:
    """Scores of ``labels`` ((ids, text, role) each) on ``heldout``, thresholds fitted on
    ``calibration``; and the [L, resamples] bootstrap AUROCs, for paired intervals."""
    ids = [x[0] for x in labels]
    both = self.margins(ids, np.concatenate([calibration.slots, heldout.slots]))
    cal, held = both[:, :len(calibration.slots)], both[:, len(calibration.slots):]
    samples = bootstrap_aurocs(held, heldout.targets, resamples, seed)
    scores = []
    for i, (token_id, text, role) in enumerate(labels):
      threshold = best_threshold(cal[i], calibration.targets)
      pred = held[i] > threshold
      ids_i = [int(t) for t in np.atleast_1d(token_id)]
      scores.append(LabelScore(
          token_id=ids_i[0] if np.ndim(token_id) == 0 else ids_i, token=text, role=role,
          auroc=auroc(held[i], heldout.targets),
          auroc_interval=interval(samples[i], confidence),
          accuracy=float((pred == (heldout.targets > 0.5)).mean()),
          balanced_accuracy=balanced_accuracy(pred, heldout.targets),
          mean_p_yes=float(jax.nn.sigmoid(held[i]).mean()),
          detection=detection(cal[i], calibration, held[i], heldout),
          correlation=pearson(held[i], heldout.activations)))
    return scores, samples


def window_max(margins: np.ndarray, split: Split) -> tuple[np.ndarray, np.ndarray]:
  """(largest margin, holds a positive) per window of ``split``, in window order."""
  windows, inverse = np.unique(split.windows, return_inverse=True)
  best = np.full(len(windows), -np.inf)
  np.maximum.at(best, inverse, margins)
  positive = np.zeros(len(windows), bool)
  np.logical_or.at(positive, inverse, split.targets > 0.5)
  return best, positive.astype(np.float32)


def detection(cal_margins, calibration: Split, held_margins, heldout: Split) -> dict:
  """delphi's detection at the window level: threshold fitted on the calibration windows."""
  cal_best, cal_pos = window_max(cal_margins, calibration)
  best, pos = window_max(held_margins, heldout)
  threshold = best_threshold(cal_best, cal_pos) if 0 < cal_pos.sum() < len(cal_pos) else 0.0
  pred = best > threshold
  return {'auroc': auroc(best, pos), 'balanced_accuracy': balanced_accuracy(pred, pos),
          'f1': f1(pred, pos), 'windows': int(len(best)), 'positive_windows': int(pos.sum())}


def random_label_tokens(allowed: np.ndarray, tokenizer, count: int, seed: int) -> list[int]:
  """Word-like tokens (letters only, 3+ characters) drawn with a fixed seed."""
  rng = np.random.default_rng(seed)
  chosen = []
  for i in rng.permutation(np.flatnonzero(allowed)):
    if len(chosen) >= count:
      break
    text = tokenizer.decode([int(i)]).strip()
    if len(text) >= 3 and text.isalpha() and text.isascii():
      chosen.append(int(i))
  return chosen


def verdict_random_tokens(config, allowed: np.ndarray, tokenizer) -> list[int]:
  """The ids of the ``eval.num_random`` random labels (``label.num_tokens`` ids each, in order)
  a verdict scores: drawn in one place, so the contrast labels are the same draw
  (``engine.pool.contrast_labels``)."""
  return random_label_tokens(allowed, tokenizer, config.eval.num_random * config.label.num_tokens,
                             config.seed)


def random_means(samples: np.ndarray, seed: int = 0) -> np.ndarray:
  """[resamples] the random labels' mean AUROC in each bootstrap replicate, the random labels
  themselves drawn again (with replacement) in every replicate.

  A handful of random labels is itself a sample: how far their mean is from that of every
  word-like token belongs in the interval, most of all under contrast, where random labels
  spread widely (one may rank the examples well by chance, another invert them).
  """
  labels, resamples = samples.shape
  pick = np.random.default_rng(seed).integers(labels, size=(resamples, labels))
  return samples[pick, np.arange(resamples)[:, None]].mean(axis=1)


def verdict(scores: list[LabelScore], samples: np.ndarray | None = None, *,
            positives: int | None = None, negatives: int | None = None,
            confidence: float = 0.95, margin: float = IDENTIFIABILITY_MARGIN) -> dict:
  """Whether the label matters on this model and feature, how sure that is, and how the found
  label compares with the reference.

  ``samples`` are ``score``'s bootstrap AUROCs (rows in the order of ``scores``). The label
  matters when the best named label (found or reference) beats both the random labels' mean and
  chance (0.5) by ``margin``, with the paired intervals of both differences above zero. It does
  not when either difference's interval lies wholly below ``margin``. Otherwise the held-out
  split is too small to tell, and the verdict says so rather than guess; as it does when the
  split holds fewer than ``MIN_HELDOUT_PER_CLASS`` positives or negatives.
  """
  roles = [s.role for s in scores]
  pick = lambda role: [i for i, r in enumerate(roles) if r == role]
  found, reference, randoms = pick('found'), pick('reference'), pick('random')
  aurocs = np.array([s.auroc for s in scores])
  random_mean = float(aurocs[randoms].mean()) if randoms else float('nan')
  named = found + reference
  best = max(named, key=lambda i: aurocs[i]) if named else None
  best_named = float(aurocs[best]) if best is not None else float('nan')
  dependence, above_chance = best_named - random_mean, best_named - 0.5
  has_samples = samples is not None and samples.size > 0 and best is not None
  if has_samples:
    dep_samples = samples[best] - (random_means(samples[randoms]) if randoms else np.nan)
    dep_ci = interval(dep_samples, confidence)
    chance_ci = interval(samples[best] - 0.5, confidence)
  else:  # no intervals: the point estimates decide, as they always did
    dep_ci = [dependence, dependence]
    chance_ci = [above_chance, above_chance]
  out = {'random_auroc_mean': random_mean,
         'random_auroc_max': float(aurocs[randoms].max()) if randoms else float('nan'),
         'best_named_auroc': best_named, 'label_dependence': dependence,
         'label_dependence_interval': dep_ci if has_samples else None,
         'above_chance': above_chance,
         'above_chance_interval': chance_ci if has_samples else None,
         'margin': margin, 'confidence': confidence, 'heldout_positives': positives,
         'heldout_negatives': negatives}
  few = any(n is not None and n < MIN_HELDOUT_PER_CLASS for n in (positives, negatives))
  if best is None or not np.isfinite(dependence) or few:
    status = UNDETERMINED
  elif (dependence >= margin and above_chance >= margin and dep_ci[0] > 0
        and chance_ci[0] > 0):
    status = IDENTIFIABLE
  elif dep_ci[1] < margin or chance_ci[1] < margin:
    status = NOT_IDENTIFIABLE
  else:
    status = UNDETERMINED
  out['status'] = status
  out['identifiable'] = status == IDENTIFIABLE
  ci = lambda c: f' [{c[0]:+.3f}, {c[1]:+.3f}]' if has_samples else ''
  evidence = (f'best named label AUROC {best_named:.3f}, random mean {random_mean:.3f}: '
              f'difference {dependence:+.3f}{ci(dep_ci)}; above chance {above_chance:+.3f}'
              f'{ci(chance_ci)}')
  if has_samples:
    evidence += f' ({100 * confidence:.0f}% intervals)'
  if status == NOT_IDENTIFIABLE:
    out['message'] = (
        f'NOT IDENTIFIABLE: the classifier\'s answers do not depend on the label here ({evidence}'
        '). No label can be learned from this model on this feature with this prompt; the found '
        'token is not evidence of what the feature means.')
  elif status == UNDETERMINED:
    n = '' if positives is None else f' ({positives} positives, {negatives} negatives)'
    reason = ('too few held-out examples' if few else
              f'the held-out examples cannot tell whether the label matters by {margin}')
    out['message'] = (
        f'UNDETERMINED: {reason}{n} ({evidence}). More held-out examples would decide it '
        '(docs/method.md#verdicts says how many).')
  else:
    out['message'] = f'IDENTIFIABLE: the label matters ({evidence}).'
  if found and reference:
    f, r = found[0], reference[0]
    diff = float(aurocs[f] - aurocs[r])
    diff_ci = interval(samples[f] - samples[r], confidence) if has_samples else None
    out['found_minus_reference'] = diff
    out['found_minus_reference_interval'] = diff_ci
    lo, hi = diff_ci or (diff, diff)
    if lo > 0:
      compare = 'beats'
    elif hi >= 0 or diff >= -0.01:
      compare = 'matches'
    else:
      compare = 'is below'
    out['found_vs_reference'] = compare
    out['found_matches_reference'] = compare != 'is below'
    fs, rs = scores[f], scores[r]
    out['message'] += (f' Found {fs.token!r}: AUROC {fs.auroc:.3f}; reference {rs.token!r}: '
                       f'{rs.auroc:.3f}; the found label {compare} the reference '
                       f'(difference {diff:+.3f}{ci(diff_ci) if diff_ci else ""}).')
    # Does the classifier use the human concept at all? When the reference word itself does not
    # clearly beat the random labels, another word that scores as well or better may work as a
    # switch on the classifier (a negation, a token that shifts its yes rate with the word's
    # script) rather than name the feature: the AUROC cannot tell those apart, so the reader is
    # told. "Matches" needs it as much as "beats": a wide interval of the difference is no
    # evidence that the two words mean the same. The classifier uses the concept when the
    # reference beats the random labels by the margin at the low end of its interval: an
    # interval that merely clears zero leaves the reference's own gain as small as noise (on
    # SmolLM2's chinese, +0.129 [+0.002, +0.259], and that lower end crossed zero or not with
    # the draw of the random words).
    ref_dep = samples[r] - random_means(samples[randoms]) if has_samples and randoms else None
    ref_ci = interval(ref_dep, confidence) if ref_dep is not None else None
    ref_point = float(aurocs[r] - random_mean)
    out['reference_dependence'] = ref_point
    out['reference_dependence_interval'] = ref_ci
    out['reference_uses_concept'] = bool(ref_point >= margin
                                         and (ref_ci is None or ref_ci[0] >= margin))
    other_word = label_key(fs.token_id) != label_key(rs.token_id)
    if (status == IDENTIFIABLE and compare != 'is below' and other_word
        and not out['reference_uses_concept']):
      out['caution'] = (f'the reference word itself barely beats the random labels '
                        f'({ref_point:+.3f}{ci(ref_ci) if ref_ci else ""}), so this classifier '
                        'hardly uses the concept; the found label may steer it by another route '
                        'than naming the feature.')
      # First words first: a reader who stops at the status must not take this for a name.
      out['message'] = out['message'].replace(
          f'{IDENTIFIABLE.upper()}:', f'{IDENTIFIABLE.upper()}, WITH A CAUTION:', 1)
      out['message'] += f' Caution: {out["caution"]}'
  return out
