"""The built-in features as one multi-feature activation-records file, to try the batch job on.

    python -m tokenspace_jax.features.synthetic_records /tmp/four_features.jsonl [--join 5]

Each sentence of a built-in feature becomes one record of that feature: the text cut at the
edges of its positive words, activation 1 on those pieces and 0 elsewhere, with the feature's
name as ``feature_id`` and its human label as ``reference_word``. Only the positives survive
the conversion, as in a real dump: which negatives were hard is not something an SAE exports.
``--join N`` makes each record N consecutive sentences, a passage of about the length of an SAE
dump's context windows (64 tokens), where several words of one text are examples.
"""

from __future__ import annotations

import json
import sys

from tokenspace_jax.features.synthetic import SYNTHETIC_FEATURES, load_synthetic_feature


def synthetic_records(name: str, feature_id=None, join: int = 1) -> list[dict]:
  """One record per sentence of built-in feature ``name``, in the data file's order; or per
  ``join`` consecutive sentences, separated by a space."""
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
  if join > 1:
    out = [_joined(out[i:i + join]) for i in range(0, len(out), join)]
  return out


def _joined(records: list[dict]) -> dict:
  tokens, acts = [], []
  for i, r in enumerate(records):
    if i:
      tokens.append(' ')
      acts.append(0.0)
    tokens += r['tokens']
    acts += r['activations']
  return {**records[0], 'text': ''.join(tokens), 'tokens': tokens, 'activations': acts}


def write_synthetic_records(path: str, names=SYNTHETIC_FEATURES, join: int = 1) -> int:
  """Writes the records of ``names`` to ``path``, feature after feature; returns the count."""
  rows = [r for name in names for r in synthetic_records(name, join=join)]
  with open(path, 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')
  return len(rows)


if __name__ == '__main__':
  args = sys.argv[1:]
  join = 1
  if len(args) == 3 and args[1] == '--join' and args[2].isdigit() and int(args[2]) >= 1:
    join = int(args.pop(2))
    args.pop(1)
  if len(args) != 1:
    sys.exit('usage: python -m tokenspace_jax.features.synthetic_records OUT.jsonl [--join N]')
  n = write_synthetic_records(args[0], join=join)
  print(f'Wrote {n} records of {len(SYNTHETIC_FEATURES)} features to {args[0]}')
