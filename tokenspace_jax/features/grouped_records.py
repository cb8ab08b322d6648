"""Many features from one activation-records file, grouped by each record's ``feature_id``.

The record format is :mod:`tokenspace_jax.features.records`' with two more keys::

  {"feature_id": 1234, "tokens": [...], "activations": [...], "reference_word": " cat"}

``feature_id`` (a string or an integer) names the feature the activations belong to;
``reference_word`` (optional, a string) is a human label to score the found one against, taken
from the first record of the feature that has one; ``source`` and ``explanation`` become the
feature's ``meta`` the same way (the importers in :mod:`tokenspace_jax.features.convert` write
them).

A dump of thousands of features should not die on one bad line: unlike ``load_records``, a
malformed record (not UTF-8, bad or too deeply nested JSON, missing or non-numeric or infinite
activations, token ids outside the vocabulary, lengths that disagree, no feature id) is reported
with its line number and skipped, and a feature that cannot be learned (no positive or no
negative example, in all its records or in one split) is reported and skipped.
Features keep the order in which their ids first appear, so the same file always gives the same
features in the same order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenspace_jax.features import records as records_lib
from tokenspace_jax.features.example import Feature, FeatureError


@dataclasses.dataclass(frozen=True)
class Problem:
  """A line or a feature that was skipped, and why (the message names the fix)."""

  error: str
  line: int | None = None
  feature_id: Any = None

  def as_dict(self) -> dict:
    out = {'error': self.error}
    if self.line is not None:
      out['line'] = self.line
    if self.feature_id is not None:
      out['feature_id'] = self.feature_id
    return out


@dataclasses.dataclass(frozen=True)
class GroupedFeatures:
  feature_ids: list  # in order of first appearance; features[i] belongs to feature_ids[i]
  features: list[Feature]
  problems: list[Problem]


def read_grouped_records(path: str, tokenizer: Any, *, threshold: float = 0.0,
                         reference_word: str = '', heldout_fraction: float = 0.2, seed: int = 0,
                         max_negatives_per_text: int | None = 4,
                         window: int | None = records_lib.DEFAULT_WINDOW,
                         vocab_size: int | None = None) -> GroupedFeatures:
  """Every learnable feature of ``path``, and the problems of the lines and features skipped.

  ``reference_word`` is the default for features whose records name none. A feature needs a
  positive and a negative example in each split: descent learns from the one, evaluation
  measures on the other. ``window`` and ``vocab_size`` are :func:`records.load_records`'.
  """
  records_lib.check_window(window)
  by_id: dict[Any, list] = {}
  references: dict[Any, str] = {}
  metas: dict[Any, dict] = {}
  problems = []
  for lineno, raw in records_lib.numbered_lines(path):
    where = f'{path} line {lineno}'
    try:
      rec = records_lib.parse_line(raw, where)
      if rec is None:
        continue
      fid = rec.get('feature_id')
      if isinstance(fid, bool) or not isinstance(fid, (str, int)):
        raise FeatureError(f'{where}: no "feature_id" (a string or an integer), so the record '
                           'belongs to no feature; add one.')
      ref = rec.get('reference_word')
      if ref is not None and not isinstance(ref, str):
        raise FeatureError(f'{where}: "reference_word" must be a string, got {ref!r}.')
      parsed = records_lib.record_fields(rec, where, tokenizer, vocab_size)
      meta = dict(metas.get(fid, {}))
      records_lib.update_meta(meta, rec, where)
    except FeatureError as e:
      problems.append(Problem(str(e), line=lineno))
      continue
    by_id.setdefault(fid, []).append(parsed)
    metas[fid] = meta
    if ref and fid not in references:
      references[fid] = ref
  records_lib.warn_negative_activations(path, [r for recs in by_id.values() for r in recs])

  ids, features = [], []
  for fid, recs in by_id.items():
    source = f'{path} feature {fid!r}'
    try:
      feature = records_lib.feature_from_records(
          recs, tokenizer, source=source, name=str(fid), threshold=threshold,
          reference_word=references.get(fid, reference_word),
          heldout_fraction=heldout_fraction, seed=seed,
          max_negatives_per_text=max_negatives_per_text, window=window, meta=metas[fid])
      for split, examples in (('train', feature.train), ('held-out', feature.heldout)):
        if not any(e.target > 0.5 for e in examples):
          raise FeatureError(f'{source}: the {split} split has no positive example ('
                             f'{len(recs)} records); add records where the feature fires.')
        if not any(e.target <= 0.5 for e in examples):
          raise FeatureError(f'{source}: the {split} split has no negative example.')
    except FeatureError as e:
      problems.append(Problem(str(e), feature_id=fid))
      continue
    ids.append(fid)
    features.append(feature)
  if not features:
    raise FeatureError(f'{path}: no feature could be labeled ({len(problems)} problems, the first: '
                       f'{problems[0].error if problems else "the file is empty"}).')
  return GroupedFeatures(feature_ids=ids, features=features, problems=problems)
