"""The built-in features as one multi-feature activation-records file, to try the batch job on.

    python -m tokenspace_jax.features.synthetic_records /tmp/four_features.jsonl

Each sentence of a built-in feature becomes one record of that feature: the text cut at the
edges of its positive words, activation 1 on those pieces and 0 elsewhere, with the feature's
name as ``feature_id`` and its human label as ``reference_word``. Only the positives survive
the conversion, as in a real dump: which negatives were hard is not something an SAE exports.
"""

from __future__ import annotations

import json
import sys

from tokenspace_jax.features.synthetic import SYNTHETIC_FEATURES, load_synthetic_feature


def synthetic_records(name: str, feature_id=None) -> list[dict]:
  """One record per sentence of built-in feature ``name``, in the data file's order."""
  feature = load_synthetic_feature(name)
  positives: dict[str, set] = {}
  for ex in feature.train + feature.heldout:
    spans = positives.setdefault(ex.text, set())
    if ex.target > 0.5:
      spans.add((ex.start, ex.end))
  out = []
  for text, spans in positives.items():
    tokens, acts, pos = [], [], 0
    for s, e in sorted(spans):
      if s > pos:
        tokens.append(text[pos:s])
        acts.append(0.0)
      tokens.append(text[s:e])
      acts.append(1.0)
      pos = e
    if pos < len(text):
      tokens.append(text[pos:])
      acts.append(0.0)
    out.append({'feature_id': name if feature_id is None else feature_id, 'text': text,
                'tokens': tokens, 'activations': acts,
                'reference_word': feature.reference_word})
  return out


def write_synthetic_records(path: str, names=SYNTHETIC_FEATURES) -> int:
  """Writes the records of ``names`` to ``path``, feature after feature; returns the count."""
  rows = [r for name in names for r in synthetic_records(name)]
  with open(path, 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')
  return len(rows)


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python -m tokenspace_jax.features.synthetic_records OUT.jsonl')
  n = write_synthetic_records(sys.argv[1])
  print(f'Wrote {n} records of {len(SYNTHETIC_FEATURES)} features to {sys.argv[1]}')
