"""Real SAE features from activation-records files (JSON Lines), aligned to the model's tokens.

One record per line, in any of three shapes::

  {"text": "The cat sat.", "tokens": ["The", " cat", " sat", "."], "activations": [0, 3.2, 0, 0]}
  {"tokens": ["The", " cat", " sat", "."], "activations": [0, 3.2, 0, 0]}
  {"text": "The cat sat.", "token_ids": [504, 2644, 3290, 30], "activations": [0, 3.2, 0, 0]}

``tokens`` are strings that concatenate exactly to ``text`` (as SAE dashboards export them).
Without ``text``, the text is their concatenation, after undoing a tokenizer's alphabet where
the tokens are in one (``Ġ``/``Ċ`` byte-level BPE, ``▁`` SentencePiece; see
:mod:`tokenspace_jax.features.token_markers`). ``token_ids`` are ids of the tokenizer passed to
:func:`load_records`, each checked against its vocabulary. ``activations`` has one finite number
per token. ``source`` (an object naming the feature in its tool's terms) and ``explanation`` (a
tool's description of it) are kept as the feature's ``meta``, from the first record that has
them; any other key (e.g. ``feature_id``, which batch jobs group by) is ignored. Blank lines are
skipped, and a UTF-8 byte-order mark is accepted.

Each line is decoded and checked on its own, so a batch job can skip a bad one and go on (see
:mod:`tokenspace_jax.features.grouped_records`); :func:`load_records` refuses the file naming it.

Long records are cut into windows of ``window`` record tokens (default 64), each with its own
text: the window, not the record, is the unit of the train/held-out split and of the
per-window negative cap, and each example carries its window's number. An SAE dump of
1024-token contexts would otherwise be a handful of texts too long for the labeler's prompt.

Activations at or below ``threshold`` (0 by default) are negatives, negative activations
included: they mean the feature points the other way, not that it fires. A file that has them
is logged once, as that is seldom what an exporter intends.

The SAE may have been trained on another tokenizer than the model that does the labeling, so
activations are moved through character offsets: each example (a word, or a model token's run
of characters in scripts written without spaces; see :mod:`tokenspace_jax.features.text_units`)
gets the maximum activation of the record tokens its characters overlap. A feature that fires
anywhere inside a word thus counts as firing on it, which is what a question about that word
should answer.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
import random
from collections.abc import Iterator
from typing import Any

from tokenspace_jax.features.example import Example, Feature, FeatureError, FeatureFileNotFoundError
from tokenspace_jax.features.text_units import example_spans
from tokenspace_jax.features.token_markers import normalize_tokens

log = logging.getLogger('tokenspace_jax')

Span = tuple[int, int]

DEFAULT_WINDOW = 64
_BOM = b'\xef\xbb\xbf'


@dataclasses.dataclass(frozen=True)
class ParsedRecord:
  """One record (or window of one): its text, each record token's span in it and activation,
  and where it came from (for messages)."""

  text: str
  spans: list[Span]
  activations: list[float]
  where: str


def load_records(path: str, tokenizer: Any, *, threshold: float = 0.0, name: str | None = None,
                 reference_word: str = '', heldout_fraction: float = 0.2, seed: int = 0,
                 max_negatives_per_text: int | None = 4, window: int | None = DEFAULT_WINDOW,
                 vocab_size: int | None = None) -> Feature:
  """A :class:`Feature` with one example per word of every record window (see the module doc).

  ``target`` is ``activation > threshold``. Negatives are capped at ``max_negatives_per_text``
  per window (``None`` keeps all), because a dump is mostly zeros and every kept example costs an
  LLM call. Windows, not words, are split into train and held-out, so no text leaks across; the
  split is stratified on whether a window has a positive, so both sides get some when possible.
  ``window=None`` keeps records whole. ``vocab_size`` bounds ``token_ids`` (default: the
  tokenizer's length). Any bad line raises :class:`FeatureError` naming it.
  """
  _check_split_arguments(heldout_fraction, max_negatives_per_text)
  check_window(window)
  records, meta = [], {}
  for lineno, raw in numbered_lines(path):
    where = f'{path} line {lineno}'
    rec = parse_line(raw, where)
    if rec is None:
      continue
    records.append(record_fields(rec, where, tokenizer, vocab_size))
    update_meta(meta, rec, where)
  if not records:
    raise FeatureError(f'{path}: no records found; each line should be a JSON object with '
                       '"tokens" or "token_ids", and "activations" (see tokenspace_jax.features.'
                       'records for the format).')
  warn_negative_activations(path, records)
  if name is None:
    name = os.path.splitext(os.path.basename(path))[0]
  return feature_from_records(records, tokenizer, source=path, name=name, threshold=threshold,
                              reference_word=reference_word, heldout_fraction=heldout_fraction,
                              seed=seed, max_negatives_per_text=max_negatives_per_text,
                              window=window, meta=meta)


def _check_split_arguments(heldout_fraction: float, max_negatives_per_text: int | None) -> None:
  if not 0.0 <= heldout_fraction < 1.0:
    raise FeatureError(f'heldout_fraction must be in [0, 1), got {heldout_fraction!r}; '
                       'use e.g. 0.2 to hold out a fifth of the records.')
  if max_negatives_per_text is not None and max_negatives_per_text < 0:
    raise FeatureError(f'max_negatives_per_text must be >= 0 or None, got '
                       f'{max_negatives_per_text!r}.')


def check_window(window: int | None) -> None:
  if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                             or window < 1):
    raise FeatureError(f'window must be a positive number of tokens or None (records kept '
                       f'whole), got {window!r}; use e.g. 64.')


def feature_from_records(records: list[ParsedRecord], tokenizer: Any, *, source: str, name: str,
                         threshold: float = 0.0, reference_word: str = '',
                         heldout_fraction: float = 0.2, seed: int = 0,
                         max_negatives_per_text: int | None = 4,
                         window: int | None = DEFAULT_WINDOW, meta: dict | None = None) -> Feature:
  """The :class:`Feature` of already parsed records (see :func:`load_records`).

  ``source`` names the records in messages (a path, or a path and a feature id).
  """
  _check_split_arguments(heldout_fraction, max_negatives_per_text)
  check_window(window)
  windows = [w for r in records for w in cut_windows(r, window)]
  per_window = [_window_examples(w, tokenizer, threshold, i) for i, w in enumerate(windows)]
  all_examples = [ex for exs in per_window for ex in exs]
  if not all_examples:
    raise FeatureError(f'{source}: the records hold no words (only whitespace or invisible '
                       'characters); add records with text.')
  if not any(ex.target for ex in all_examples):
    top = max(ex.activation for ex in all_examples)
    hint = (f'Pass a lower threshold, e.g. threshold={top / 2:g} '
            f'(--config.feature.threshold={top / 2:g})' if top > 0 else
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
  capped = [_cap_negatives(exs, max_negatives_per_text, rng) for exs in per_window]
  heldout_ids = _heldout_records([any(ex.target for ex in exs) for exs in per_window],
                                 heldout_fraction, seed)
  train = tuple(ex for i, exs in enumerate(capped) if i not in heldout_ids for ex in exs)
  heldout = tuple(ex for i, exs in enumerate(capped) if i in heldout_ids for ex in exs)
  return Feature(name=name, reference_word=reference_word, train=train, heldout=heldout,
                 description=f'activation records from {source}, threshold {threshold}',
                 meta=dict(meta or {}))


# --- reading lines ---------------------------------------------------------------------------


def numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """``(line number, raw bytes)`` of each line, split on ``\\n`` only (JSON strings may hold
  U+2028 and other characters that ``str.splitlines`` would break lines at). Bytes, because
  one line that is not UTF-8 must not stop the others from being read."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError as e:
    raise FeatureFileNotFoundError(
        f'Activation records file not found: {path!r}; check the path (it is resolved '
        f'relative to {os.getcwd()!r}).') from e
  except OSError as e:
    raise FeatureError(f'{path}: cannot be read ({e.strerror}); pass a readable JSON Lines '
                       'file.') from e
  if data.startswith(_BOM):
    data = data[len(_BOM):]
  for lineno, line in enumerate(data.split(b'\n'), start=1):
    yield lineno, line.rstrip(b'\r')


def parse_line(raw: bytes, where: str) -> dict | None:
  """The JSON object of one line, or None for a blank line; FeatureError for anything else."""
  try:
    line = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise FeatureError(f'{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); '
                       'save the records file as UTF-8 JSON Lines.') from None
  if not line.strip():
    return None
  try:
    rec = json.loads(line)
  except json.JSONDecodeError as e:
    raise FeatureError(f'{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be '
                       'one complete JSON object.') from None
  except RecursionError:
    raise FeatureError(f'{where}: JSON nested too deeply to read; write one flat '
                       '{"tokens": [...], "activations": [...]} object per line.') from None
  except ValueError as e:  # e.g. an integer of more digits than Python converts
    raise FeatureError(f'{where}: unreadable JSON value ({e}).') from None
  if not isinstance(rec, dict):
    raise FeatureError(f'{where}: expected a JSON object, got {type(rec).__name__}; write one '
                       '{"tokens": [...], "activations": [...]} object per line.')
  return rec


def update_meta(meta: dict, rec: dict, where: str) -> None:
  """Keeps the first ``source`` object and ``explanation`` string of a feature's records."""
  source, explanation = rec.get('source'), rec.get('explanation')
  if source is not None and not isinstance(source, dict):
    raise FeatureError(f'{where}: "source" must be a JSON object naming the feature in its '
                       f'tool\'s terms, got {source!r}.')
  if explanation is not None and not isinstance(explanation, str):
    raise FeatureError(f'{where}: "explanation" must be a string, got {explanation!r}.')
  if source and 'source' not in meta:
    meta['source'] = source
  if explanation and 'explanation' not in meta:
    meta['explanation'] = explanation


def warn_negative_activations(path: str, records: list[ParsedRecord]) -> None:
  negative = [a for r in records for a in r.activations if a < 0]
  if negative:
    log.warning('%s: %d activations are negative (the smallest is %g); they count as not firing, '
                'as only activations above the threshold are positives.', path, len(negative),
                min(negative))


# --- one record ------------------------------------------------------------------------------


def record_fields(rec: dict, where: str, tokenizer: Any,
                  vocab_size: int | None = None) -> ParsedRecord:
  """The :class:`ParsedRecord` of one line's already decoded object."""
  acts = _activations(rec, where)
  if 'tokens' in rec:
    tokens = rec['tokens']
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
      raise FeatureError(f'{where}: "tokens" must be a list of strings.')
    _check_lengths(where, 'tokens', len(tokens), len(acts))
    for i, tok in enumerate(tokens):
      _check_string(tok, f'token {i}', where)
    text = rec.get('text')
    if text is None:
      tokens, acts = normalize_tokens(tokens, acts, where)
      text = ''.join(tokens)
    elif not isinstance(text, str):
      raise FeatureError(f'{where}: "text" must be a string.')
    _check_string(text, '"text"', where)
    return ParsedRecord(text, _concatenation_spans(tokens, text, where), acts, where)
  if 'token_ids' in rec:
    ids, text = rec['token_ids'], rec.get('text')
    if not isinstance(text, str):
      raise FeatureError(f'{where}: "token_ids" need the "text" they encode; add a "text" key.')
    _check_string(text, '"text"', where)
    if not (isinstance(ids, list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
      raise FeatureError(f'{where}: "token_ids" must be a list of integers.')
    _check_lengths(where, 'token_ids', len(ids), len(acts))
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    for i, t in enumerate(ids):
      if not 0 <= t < vocab:
        shown = t if abs(t) < 10**12 else f'an integer of {len(str(abs(t)))} digits'
        raise FeatureError(f'{where}: token id {i} is {shown}, outside the vocabulary '
                           f'[0, {vocab}); pass ids of the labeling model\'s tokenizer, or '
                           '"tokens" strings.')
    return ParsedRecord(text, _id_spans(ids, text, tokenizer, where), acts, where)
  raise FeatureError(f'{where}: no "tokens" or "token_ids" key; add the tokens (strings that '
                     'concatenate to the text) or their ids.')


def _activations(rec: dict, where: str) -> list[float]:
  acts = rec.get('activations')
  if not isinstance(acts, list):
    raise FeatureError(f'{where}: missing "activations" list; add one number per token.')
  out = []
  for i, a in enumerate(acts):
    if isinstance(a, bool) or not isinstance(a, (int, float)):
      raise FeatureError(f'{where}: activation {i} is {a!r:.40}, not a number; write plain '
                         'numbers.')
    try:
      value = float(a)
    except OverflowError:
      value = math.inf
    if not math.isfinite(value):
      shown = a if isinstance(a, float) else f'an integer of {len(str(abs(a)))} digits'
      raise FeatureError(f'{where}: activation {i} is {shown}; activations must be finite '
                         'numbers, so replace NaN/inf (e.g. by 0) or drop the record.')
    out.append(value)
  return out


def _check_string(s: str, what: str, where: str) -> None:
  try:
    s.encode('utf-8')
  except UnicodeEncodeError as e:
    raise FeatureError(f'{where}: {what} holds a lone surrogate ({s[e.start]!r} at character '
                       f'{e.start}), which is no character; escape whole characters only.'
                       ) from None


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


def _model_tokens(text: str, tokenizer: Any, where: str) -> tuple[list[int], list[Span]]:
  try:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  except NotImplementedError as e:
    raise FeatureError('The tokenizer cannot return character offsets; load a "fast" '
                       'tokenizer (use_fast=True), which is needed to align activations.') from e
  except Exception as e:  # A tokenizer failing on one text must not end a batch job.
    raise FeatureError(f'{where}: the tokenizer failed on this text ({type(e).__name__}: '
                       f'{e}).') from e
  return list(enc['input_ids']), [tuple(span) for span in enc['offset_mapping']]


def _decode(tokenizer: Any, ids: list[int], where: str) -> str:
  try:
    return tokenizer.decode(ids)
  except Exception as e:  # As in _model_tokens.
    raise FeatureError(f'{where}: the tokenizer cannot decode these token ids '
                       f'({type(e).__name__}: {e}).') from e


def _id_spans(ids: list[int], text: str, tokenizer: Any, where: str) -> list[Span]:
  """Character spans of the record's token ids within ``text``.

  When the ids are the tokenizer's own encoding of the text, its offsets are exact. Otherwise
  each token ends where the decoded prefix stops agreeing with the text; a token holding only
  part of a multi-byte character gets the span of that character.
  """
  model_ids, model_spans = _model_tokens(text, tokenizer, where)
  if model_ids == ids:
    return model_spans
  ends = []
  for i in range(len(ids)):
    prefix = _decode(tokenizer, ids[:i + 1], where)
    n = 0
    while n < min(len(prefix), len(text)) and prefix[n] == text[n]:
      n += 1
    ends.append(n)
  if ids and ends[-1] != len(text):
    raise FeatureError(f'{where}: the token ids decode to {_decode(tokenizer, ids, where)!r:.200}, '
                       'not to the text; pass ids from the same tokenizer as load_records, or use '
                       '"tokens".')
  spans, start = [], 0
  for i, end in enumerate(ends):
    if end <= start:  # Partial character: borrow the span of the token that completes it.
      end = next((e for e in ends[i:] if e > start), start)
      spans.append((start, end))
    else:
      spans.append((start, end))
      start = end
  return spans


# --- windows and examples --------------------------------------------------------------------


def cut_windows(record: ParsedRecord, window: int | None) -> list[ParsedRecord]:
  """``record`` cut into consecutive windows of ``window`` record tokens, each its own text.

  A cut never falls inside a character: where tokens share one (the bytes of a multi-byte
  character), the cut moves to the next token that starts a character of its own.
  """
  n = len(record.spans)
  if window is None or n <= window:
    return [record]
  cuts = [0]
  i = window
  while i < n:
    while i < n and record.spans[i][0] < record.spans[i - 1][1]:
      i += 1
    if i >= n:
      break
    cuts.append(i)
    i += window
  cuts.append(n)
  out = []
  for k, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
    lo = 0 if k == 0 else record.spans[a][0]
    hi = len(record.text) if b == n else record.spans[b][0]
    spans = [(max(s, lo) - lo, min(e, hi) - lo) for s, e in record.spans[a:b]]
    out.append(ParsedRecord(record.text[lo:hi], spans, record.activations[a:b],
                            f'{record.where} window {k}'))
  return out


def _window_examples(record: ParsedRecord, tokenizer: Any, threshold: float,
                     window_index: int) -> list[Example]:
  """One example per word of the window (see text_units), with the max overlapping activation."""
  _, model_spans = _model_tokens(record.text, tokenizer, record.where)
  overlap_max = _overlap_max(record.spans, record.activations)
  examples = []
  for s, e in example_spans(record.text, model_spans):
    act = overlap_max(s, e)
    if act is not None:
      examples.append(Example(record.text, s, e, float(act > threshold), act,
                              window=window_index))
  return examples


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
  """Window indices held out: ``fraction`` of them, stratified on having a positive."""
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
