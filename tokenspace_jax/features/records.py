"""Real SAE features from activation-records files (JSON Lines), aligned to the model's tokens.

One record per line, in any of three shapes::

  {"text": "The cat sat.", "tokens": ["The", " cat", " sat", "."], "activations": [0, 3.2, 0, 0]}
  {"tokens": ["The", " cat", " sat", "."], "activations": [0, 3.2, 0, 0]}
  {"text": "The cat sat.", "token_ids": [504, 2644, 3290, 30], "activations": [0, 3.2, 0, 0]}

``tokens`` are strings that concatenate exactly to ``text`` (as SAE dashboards export them; the
text defaults to their concatenation). ``token_ids`` are ids of the tokenizer passed to
:func:`load_records`. ``activations`` has one finite number per token. Any other key (e.g.
``feature_id``, which batch jobs group by) is ignored. Blank lines are skipped.

The SAE may have been trained on another tokenizer than the model that does the labeling, so
activations are moved through character offsets: each model token gets the maximum activation of
the record tokens its characters overlap. A feature that fires anywhere inside a model token thus
counts as firing on it, which is what a question about that token should answer.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
from typing import Any

from tokenspace_jax.features.example import Example, Feature, FeatureError, FeatureFileNotFoundError

Span = tuple[int, int]


def load_records(path: str, tokenizer: Any, *, threshold: float = 0.0, name: str | None = None,
                 reference_word: str = '', heldout_fraction: float = 0.2, seed: int = 0,
                 max_negatives_per_text: int | None = 4) -> Feature:
  """A :class:`Feature` with one example per non-blank model token of every record.

  ``target`` is ``activation > threshold``. Negatives are capped at ``max_negatives_per_text``
  per record (``None`` keeps all), because a dump is mostly zeros and every kept example costs an
  LLM call. Records, not tokens, are split into train and held-out, so no text leaks across; the
  split is stratified on whether a record has a positive, so both sides get some when possible.
  """
  _check_split_arguments(heldout_fraction, max_negatives_per_text)
  records = _read_records(path, tokenizer)
  if not records:
    raise FeatureError(f'{path}: no records found; each line should be a JSON object with '
                       '"tokens" or "token_ids", and "activations" (see tokenspace_jax.features.'
                       'records for the format).')
  if name is None:
    name = os.path.splitext(os.path.basename(path))[0]
  return feature_from_records(records, tokenizer, source=path, name=name, threshold=threshold,
                              reference_word=reference_word, heldout_fraction=heldout_fraction,
                              seed=seed, max_negatives_per_text=max_negatives_per_text)


def _check_split_arguments(heldout_fraction: float, max_negatives_per_text: int | None) -> None:
  if not 0.0 <= heldout_fraction < 1.0:
    raise FeatureError(f'heldout_fraction must be in [0, 1), got {heldout_fraction!r}; '
                       'use e.g. 0.2 to hold out a fifth of the records.')
  if max_negatives_per_text is not None and max_negatives_per_text < 0:
    raise FeatureError(f'max_negatives_per_text must be >= 0 or None, got '
                       f'{max_negatives_per_text!r}.')


def feature_from_records(records: list[tuple[str, list[Span], list[float]]], tokenizer: Any, *,
                         source: str, name: str, threshold: float = 0.0, reference_word: str = '',
                         heldout_fraction: float = 0.2, seed: int = 0,
                         max_negatives_per_text: int | None = 4) -> Feature:
  """The :class:`Feature` of already parsed records (see :func:`load_records`).

  ``source`` names the records in messages (a path, or a path and a feature id).
  """
  _check_split_arguments(heldout_fraction, max_negatives_per_text)
  per_record = [_record_examples(text, spans, acts, tokenizer, threshold)
                for text, spans, acts in records]
  all_examples = [ex for exs in per_record for ex in exs]
  if not all_examples:
    raise FeatureError(f'{source}: the records hold no non-blank tokens; add records with text.')
  if not any(ex.target for ex in all_examples):
    top = max(ex.activation for ex in all_examples)
    hint = (f'Pass a lower threshold, e.g. threshold={top / 2:g}' if top > 0 else
            'The feature never fires in this file; check that it holds this feature\'s '
            f'activations (or pass a threshold below {top:g})')
    raise FeatureError(
        f'{source}: no positive example: no token has an activation above threshold={threshold} '
        f'(the largest activation found is {top:g}). {hint}.')
  if all(ex.target for ex in all_examples):
    low = min(ex.activation for ex in all_examples)
    raise FeatureError(
        f'{source}: no negative example: every token has an activation above threshold='
        f'{threshold} (the smallest is {low:g}). Pass a higher threshold, or add records '
        'where the feature does not fire.')

  rng = random.Random(seed)
  capped = [_cap_negatives(exs, max_negatives_per_text, rng) for exs in per_record]
  heldout_ids = _heldout_records([any(ex.target for ex in exs) for exs in per_record],
                                 heldout_fraction, seed)
  train = tuple(ex for i, exs in enumerate(capped) if i not in heldout_ids for ex in exs)
  heldout = tuple(ex for i, exs in enumerate(capped) if i in heldout_ids for ex in exs)
  return Feature(name=name, reference_word=reference_word, train=train, heldout=heldout,
                 description=f'activation records from {source}, threshold {threshold}')


def read_lines(path: str) -> list[str]:
  """The file's lines, split on newlines only: JSON strings may hold U+2028 and other
  characters that ``str.splitlines`` would break lines at (and so miscount them)."""
  try:
    with open(path, encoding='utf-8', newline='') as f:
      text = f.read()
  except FileNotFoundError as e:
    raise FeatureFileNotFoundError(
        f'Activation records file not found: {path!r}; check the path (it is resolved '
        f'relative to {os.getcwd()!r}).') from e
  except UnicodeDecodeError as e:
    raise FeatureError(f'{path}: not UTF-8 text ({e}); save the records file as UTF-8 JSON '
                       'Lines.') from e
  return [line.rstrip('\r') for line in text.split('\n')]


def _read_records(path: str, tokenizer: Any) -> list[tuple[str, list[Span], list[float]]]:
  lines = read_lines(path)
  records = []
  for lineno, line in enumerate(lines, start=1):
    if line.strip():
      records.append(_parse_record(line, f'{path} line {lineno}', tokenizer))
  return records


def _parse_record(line: str, where: str, tokenizer: Any) -> tuple[str, list[Span], list[float]]:
  """``(text, character span of each record token, activation of each record token)``."""
  return _record_fields(_json_object(line, where), where, tokenizer)


def _json_object(line: str, where: str) -> dict:
  try:
    rec = json.loads(line)
  except json.JSONDecodeError as e:
    raise FeatureError(f'{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be '
                       'one complete JSON object.') from e
  if not isinstance(rec, dict):
    raise FeatureError(f'{where}: expected a JSON object, got {type(rec).__name__}; write one '
                       '{"tokens": [...], "activations": [...]} object per line.')
  return rec


def _record_fields(rec: dict, where: str, tokenizer: Any) -> tuple[str, list[Span], list[float]]:
  """What :func:`_parse_record` returns, from the already decoded object of one line."""
  acts = rec.get('activations')
  if not isinstance(acts, list):
    raise FeatureError(f'{where}: missing "activations" list; add one number per token.')
  for i, a in enumerate(acts):
    if isinstance(a, bool) or not isinstance(a, (int, float)):
      raise FeatureError(f'{where}: activation {i} is {a!r}, not a number; write plain numbers.')
    if not math.isfinite(a):
      raise FeatureError(f'{where}: activation {i} is {a}; activations must be finite numbers, '
                         'so replace NaN/inf (e.g. by 0) or drop the record.')

  if 'tokens' in rec:
    tokens = rec['tokens']
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
      raise FeatureError(f'{where}: "tokens" must be a list of strings.')
    text = rec.get('text', ''.join(tokens))
    if not isinstance(text, str):
      raise FeatureError(f'{where}: "text" must be a string.')
    _check_lengths(where, 'tokens', len(tokens), len(acts))
    return text, _concatenation_spans(tokens, text, where), [float(a) for a in acts]
  if 'token_ids' in rec:
    ids, text = rec['token_ids'], rec.get('text')
    if not isinstance(text, str):
      raise FeatureError(f'{where}: "token_ids" need the "text" they encode; add a "text" key.')
    if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
      raise FeatureError(f'{where}: "token_ids" must be a list of integers.')
    _check_lengths(where, 'token_ids', len(ids), len(acts))
    return text, _id_spans(ids, text, tokenizer, where), [float(a) for a in acts]
  raise FeatureError(f'{where}: no "tokens" or "token_ids" key; add the tokens (strings that '
                     'concatenate to the text) or their ids.')


def _check_lengths(where: str, key: str, n_tokens: int, n_acts: int) -> None:
  if n_tokens != n_acts:
    raise FeatureError(f'{where}: {n_tokens} {key} but {n_acts} activations; the lists must have '
                       'the same length (one activation per token).')


def _concatenation_spans(tokens: list[str], text: str, where: str) -> list[Span]:
  spans, pos = [], 0
  for i, tok in enumerate(tokens):
    if not text.startswith(tok, pos):
      raise FeatureError(
          f'{where}: tokens do not concatenate to the text: token {i} {tok!r} does not match the '
          f'text at character {pos} ({text[pos:pos + len(tok) + 10]!r}), so character offsets '
          'cannot be computed. Export tokens as the exact substrings of the text (undo markers '
          'such as "Ġ" or "▁"), or drop "text" so it is rebuilt from the tokens.')
    spans.append((pos, pos + len(tok)))
    pos += len(tok)
  if pos != len(text):
    raise FeatureError(f'{where}: tokens cover only the first {pos} of {len(text)} characters of '
                       'the text; add the missing tokens or shorten "text" to match.')
  return spans


def _model_tokens(text: str, tokenizer: Any) -> tuple[list[int], list[Span]]:
  try:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  except NotImplementedError as e:
    raise FeatureError('The tokenizer cannot return character offsets; load a "fast" '
                       'tokenizer (use_fast=True), which is needed to align activations.') from e
  return list(enc['input_ids']), [tuple(span) for span in enc['offset_mapping']]


def _id_spans(ids: list[int], text: str, tokenizer: Any, where: str) -> list[Span]:
  """Character spans of the record's token ids within ``text``.

  When the ids are the tokenizer's own encoding of the text, its offsets are exact. Otherwise
  each token ends where the decoded prefix stops agreeing with the text; a token holding only
  part of a multi-byte character gets the span of that character.
  """
  model_ids, model_spans = _model_tokens(text, tokenizer)
  if model_ids == ids:
    return model_spans
  ends = []
  for i in range(len(ids)):
    prefix = tokenizer.decode(ids[:i + 1])
    n = 0
    while n < min(len(prefix), len(text)) and prefix[n] == text[n]:
      n += 1
    ends.append(n)
  if ids and ends[-1] != len(text):
    raise FeatureError(f'{where}: the token ids decode to {tokenizer.decode(ids)!r}, not to the '
                       'text; pass ids from the same tokenizer as load_records, or use "tokens".')
  spans, start = [], 0
  for i, end in enumerate(ends):
    if end <= start:  # Partial character: borrow the span of the token that completes it.
      end = next((e for e in ends[i:] if e > start), start)
      spans.append((start, end))
    else:
      spans.append((start, end))
      start = end
  return spans


def _record_examples(text: str, spans: list[Span], acts: list[float], tokenizer: Any,
                     threshold: float) -> list[Example]:
  """One example per distinct non-blank model-token span, with the max overlapping activation."""
  _, model_spans = _model_tokens(text, tokenizer)
  overlap_max = _overlap_max(spans, acts)
  by_span: dict[Span, float] = {}
  for s, e in model_spans:
    word = text[s:e]
    stripped = word.strip()
    if not stripped:
      continue
    act = overlap_max(s, e)
    if act is None:
      continue
    # Byte-level BPE splits a multi-byte character over several tokens with the same span; they
    # are one word to the labeler, so they merge into one example.
    s2 = s + (len(word) - len(word.lstrip()))
    key = (s2, s2 + len(stripped))
    by_span[key] = max(by_span.get(key, -math.inf), act)
  return [Example(text, s, e, float(a > threshold), a) for (s, e), a in sorted(by_span.items())]


def _overlap_max(spans: list[Span], acts: list[float]):
  """``f(s, e)``: the max activation of the record tokens overlapping ``[s, e)``, or None.

  Record spans run left to right, so bisection finds the candidates; this keeps long records
  (thousands of tokens) linear-ish instead of quadratic.
  """
  starts = [s for s, _ in spans]
  ends = [e for _, e in spans]
  ordered = all(starts[i] <= starts[i + 1] and ends[i] <= ends[i + 1]
                for i in range(len(spans) - 1))

  def lookup(s: int, e: int) -> float | None:
    lo, hi = ((bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)) if ordered
              else (0, len(spans)))
    vals = [acts[i] for i in range(lo, hi) if starts[i] < e and s < ends[i]]
    return max(vals) if vals else None

  return lookup


def _cap_negatives(examples: list[Example], cap: int | None, rng: random.Random) -> list[Example]:
  negatives = [i for i, ex in enumerate(examples) if not ex.target]
  if cap is None or len(negatives) <= cap:
    return examples
  keep = set(rng.sample(negatives, cap))
  return [ex for i, ex in enumerate(examples) if ex.target or i in keep]


def _heldout_records(has_positive: list[bool], fraction: float, seed: int) -> set[int]:
  """Record indices held out: ``fraction`` of them, stratified on having a positive."""
  rng = random.Random(f'heldout:{seed}')
  with_pos = [i for i, h in enumerate(has_positive) if h]
  without = [i for i, h in enumerate(has_positive) if not h]
  rng.shuffle(with_pos)
  rng.shuffle(without)
  n_total = round(len(has_positive) * fraction)
  n_pos = round(len(with_pos) * fraction)
  if fraction > 0 and len(with_pos) >= 2:
    n_pos = min(max(n_pos, 1), len(with_pos) - 1)  # Positives on both sides when possible.
  n_neg = min(max(n_total - n_pos, 0), max(len(without) - 1, 0))
  return set(with_pos[:n_pos] + without[:n_neg])
