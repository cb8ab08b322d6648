"""Scoring discrete labels on held-out examples, against baselines, with an identifiability check.

A found label means something only relative to what *any* label achieves: a small model may
separate positives from negatives by the word alone, whatever the concept says. So the found
token, the human reference word and a few random tokens are scored the same way, and the run
says plainly when the label makes no difference.

Accuracy needs a decision threshold on the yes/no margin. It is fitted on training examples
for each label separately (maximising balanced accuracy) and applied to the held-out split, so
no label is favoured by the model's overall yes/no tendency.
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


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U), ties counted half."""
  pos, neg = scores[targets > 0.5], scores[targets <= 0.5]
  if len(pos) == 0 or len(neg) == 0:
    return float('nan')
  greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return float(greater / (len(pos) * len(neg)))


def balanced_accuracy(pred: np.ndarray, targets: np.ndarray) -> float:
  t = targets > 0.5
  return float(0.5 * (pred[t].mean() + (~pred[~t]).mean()))


def best_threshold(scores: np.ndarray, targets: np.ndarray) -> float:
  candidates = np.unique(scores)
  mids = np.concatenate([[candidates[0] - 1], (candidates[1:] + candidates[:-1]) / 2,
                         [candidates[-1] + 1]])
  accs = [balanced_accuracy(scores > m, targets) for m in mids]
  return float(mids[int(np.argmax(accs))])


@dataclasses.dataclass(frozen=True)
class LabelScore:
  token_id: int | list[int]  # a list for a label of several tokens
  token: str
  role: str  # 'found', 'reference', 'random'
  auroc: float
  accuracy: float
  balanced_accuracy: float
  mean_p_yes: float

  def as_dict(self):
    return dataclasses.asdict(self)


class LabelScorer:
  """Yes/no margins of fixed labels (one token, or a sequence filling a multi-token slot),
  over examples given by index."""

  def __init__(self, model: Llama, params, caches: prefix.PrefixCaches, tail_ids, answer_ids,
               full_vocab: bool, batch_size: int = 32):
    self.model, self.params, self.caches = model, params, caches
    self.tail_ids, self.answer_ids = jnp.asarray(tail_ids), jnp.asarray(answer_ids)
    self.full_vocab, self.batch_size = full_vocab, batch_size

  @functools.cached_property
  def _margins(self):
    @jax.jit
    def run(params, caches, idx, token_ids, tail_ids, answer_ids):
      emb = params['embed'][token_ids]  # [K, hidden]: one compilation per label length
      lp = prefix.answer_log_probs(self.model, params, caches.take(idx), emb, tail_ids,
                                       answer_ids, jnp.zeros(()), self.full_vocab)
      return lp[:, 0] - lp[:, 1]
    return run

  def margins(self, token_id: int | list[int], idx: np.ndarray) -> np.ndarray:
    """log P(yes) - log P(no) per example (the same order as ``idx``)."""
    out = []
    for start in range(0, len(idx), self.batch_size):
      chunk = idx[start:start + self.batch_size]
      padded = np.pad(chunk, (0, self.batch_size - len(chunk)), mode='edge')
      m = self._margins(self.params, self.caches, jnp.asarray(padded, jnp.int32),
                        jnp.atleast_1d(jnp.asarray(token_id, jnp.int32)), self.tail_ids,
                        self.answer_ids)
      out.append(np.asarray(m)[:len(chunk)])
    return np.concatenate(out)

  def score(self, token_id: int | list[int], token: str, role: str, calib_idx, calib_targets,
            eval_idx, eval_targets) -> LabelScore:
    threshold = best_threshold(self.margins(token_id, calib_idx), calib_targets)
    m = self.margins(token_id, eval_idx)
    pred = m > threshold
    ids = [int(i) for i in np.atleast_1d(token_id)]
    return LabelScore(token_id=ids[0] if np.ndim(token_id) == 0 else ids, token=token, role=role,
                      auroc=auroc(m, eval_targets),
                      accuracy=float((pred == (eval_targets > 0.5)).mean()),
                      balanced_accuracy=balanced_accuracy(pred, eval_targets),
                      mean_p_yes=float(jax.nn.sigmoid(m).mean()))


def random_label_tokens(allowed: np.ndarray, tokenizer, count: int, seed: int) -> list[int]:
  """Word-like tokens (letters only, 3+ characters) drawn with a fixed seed."""
  rng = np.random.default_rng(seed)
  chosen = []
  for i in rng.permutation(np.flatnonzero(allowed)):
    text = tokenizer.decode([int(i)]).strip()
    if len(text) >= 3 and text.isalpha() and text.isascii():
      chosen.append(int(i))
    if len(chosen) == count:
      break
  return chosen


def verdict(scores: list[LabelScore], margin: float = IDENTIFIABILITY_MARGIN) -> dict:
  """Whether the label matters on this model and feature, and how the found one compares."""
  by_role = lambda r: [s for s in scores if s.role == r]
  found, reference, randoms = by_role('found'), by_role('reference'), by_role('random')
  random_aucs = np.array([s.auroc for s in randoms])
  random_mean = float(random_aucs.mean()) if len(random_aucs) else float('nan')
  random_max = float(random_aucs.max()) if len(random_aucs) else float('nan')
  best_named = max([s.auroc for s in found + reference], default=float('nan'))
  dependence = best_named - random_mean
  # Beating random tokens is not enough when they score below chance: the named label must also
  # beat chance (0.5) by the margin.
  above_chance = best_named - 0.5
  identifiable = bool(dependence >= margin and above_chance >= margin)
  out = {'identifiable': identifiable, 'random_auroc_mean': random_mean,
         'random_auroc_max': random_max, 'best_named_auroc': best_named,
         'label_dependence': dependence, 'above_chance': above_chance, 'margin': margin}
  ref = reference[0] if reference else None
  f = found[0] if found else None
  weak = (f' The classifier is weak here (best AUROC {best_named:.3f}; chance is 0.5).'
          if best_named < 0.6 else '')
  if not identifiable and dependence >= margin:
    out['message'] = (
        f'NOT IDENTIFIABLE: the best named label scores AUROC {best_named:.3f}, near chance '
        f'(0.5), though random tokens do worse (mean {random_mean:.3f}). The classifier cannot '
        'use this concept; the found token is not evidence of what the feature means.')
  elif not identifiable:
    out['message'] = (
        'NOT IDENTIFIABLE: the classifier separates positives from negatives about equally well '
        f'whatever the label (random tokens: mean AUROC {random_mean:.3f}, best named label '
        f'{best_named:.3f}). No label can be learned from this model on this feature with this '
        'prompt; the found token is not evidence of what the feature means.' + weak)
  elif f is not None and ref is not None:
    beats = f.auroc >= ref.auroc - 0.01
    out['found_matches_reference'] = bool(beats)
    out['message'] = (
        f'The label matters (best named label AUROC {best_named:.3f} vs random mean '
        f'{random_mean:.3f}). Found {f.token!r}: AUROC {f.auroc:.3f}, balanced accuracy '
        f'{f.balanced_accuracy:.3f}; reference {ref.token!r}: AUROC {ref.auroc:.3f}, balanced '
        f'accuracy {ref.balanced_accuracy:.3f}. The found label '
        + ('scores at least as well as the human reference.' if beats
           else 'scores below the human reference.') + weak)
  else:
    out['message'] = f'The label matters (best AUROC {best_named:.3f} vs random {random_mean:.3f}).'
  return out
