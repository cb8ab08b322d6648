"""One record of the project's format from a tool's token strings and activations.

Shared by the importers that get token *strings* (OpenAI, Neuronpedia, delphi's scored
examples, SAELens' ``to_str_tokens``): the strings are checked, undone from a tokenizer's
alphabet (:mod:`tokenspace_jax.features.token_markers`), and stripped of the special tokens
(``<|endoftext|>``, ``<bos>``, ...) that dashboards keep at the start of a context but that are
no text of it. What cannot be made into clean text raises :class:`FeatureError`, which the
importer turns into a skip of that record.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

from tokenspace_jax.features.example import FeatureError, FeatureFileNotFoundError
from tokenspace_jax.features.token_markers import normalize_tokens

_SPECIAL = re.compile(r'<\|[^<>|\s]{1,40}\|>|</?s>|<(?:bos|eos|pad|start_of_turn|end_of_turn)>')
_UNKNOWN = frozenset({'<unk>', '<|unk|>', '[UNK]'})


def numbers(values: Any, what: str, where: str) -> list[float]:
  """``values`` as finite floats, or FeatureError naming the first that is not one."""
  if not isinstance(values, list):
    raise FeatureError(f'{where}: "{what}" must be a list of numbers, got '
                       f'{type(values).__name__}.')
  out = []
  for i, v in enumerate(values):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise FeatureError(f'{where}: {what}[{i}] is {v!r:.40}, not a number.')
    try:
      f = float(v)
    except OverflowError:
      f = math.inf
    if not math.isfinite(f):
      raise FeatureError(f'{where}: {what}[{i}] is not a finite number; the record cannot be '
                         'scored.')
    out.append(f)
  return out


def strings(values: Any, what: str, where: str) -> list[str]:
  if not (isinstance(values, list) and all(isinstance(t, str) for t in values)):
    raise FeatureError(f'{where}: "{what}" must be a list of strings.')
  for i, t in enumerate(values):
    try:
      t.encode('utf-8')
    except UnicodeEncodeError:
      raise FeatureError(f'{where}: {what}[{i}] holds a lone surrogate, which is no '
                         'character.') from None
  return values


def token_record(feature_id: Any, tokens: list[str], activations: list[float], where: str, *,
                 source: dict, scheme: str = 'auto') -> dict:
  """The record ``{feature_id, tokens, activations, source}`` of clean text tokens."""
  if len(tokens) != len(activations):
    raise FeatureError(f'{where}: {len(tokens)} tokens but {len(activations)} activations.')
  kept = [(t, a) for t, a in zip(tokens, activations, strict=True) if not _SPECIAL.fullmatch(t)]
  for i, (t, _) in enumerate(kept):
    if t in _UNKNOWN:
      raise FeatureError(f'{where}: token {i} is {t}: the tokenizer lost this text, so it '
                         'cannot be labeled.')
  tokens, activations = normalize_tokens([t for t, _ in kept], [a for _, a in kept], where,
                                         scheme)
  if not ''.join(tokens).strip():
    raise FeatureError(f'{where}: no text left (only special tokens or whitespace).')
  return {'feature_id': feature_id, 'tokens': tokens, 'activations': activations,
          'source': source}


class Deduplicator:
  """Drops a record identical (tokens and activations) to an earlier one of the same feature:
  tools list the same context in several samples (top and random, or once per scorer)."""

  def __init__(self):
    self._seen: dict[Any, set[int]] = {}

  def is_new(self, rec: dict) -> bool:
    key = hash((tuple(rec.get('tokens') or rec.get('token_ids')), tuple(rec['activations'])))
    seen = self._seen.setdefault((type(rec['feature_id']).__name__, rec['feature_id']), set())
    if key in seen:
      return False
    seen.add(key)
    return True


def fires(rec: dict) -> bool:
  return any(a > 0 for a in rec['activations'])


# --- files -----------------------------------------------------------------------------------


def expand(paths: list[str] | str, suffixes: tuple[str, ...]) -> list[str]:
  """Files of ``paths``: files as given, folders searched (recursively, sorted) for
  ``suffixes``. A missing path is one FeatureFileNotFoundError."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for p in map(str, paths):
    if os.path.isdir(p):
      found = sorted(os.path.join(d, f) for d, _, files in os.walk(p) for f in files
                     if f.endswith(suffixes))
      if not found:
        raise FeatureError(f'{p}: no {" or ".join(suffixes)} files in this folder.')
      out += found
    elif os.path.exists(p):
      out.append(p)
    else:
      raise FeatureFileNotFoundError(f'{p}: no such file or folder; check the path.')
  if not out:
    raise FeatureError('No input files given; pass the files (or folders) to convert.')
  return out


def read_bytes(path: str) -> bytes:
  try:
    with open(path, 'rb') as f:
      data = f.read()
    if path.endswith('.gz'):
      data = gzip.decompress(data)
  except (OSError, EOFError) as e:
    raise FeatureError(f'{path}: cannot be read ({e}); check that the file is complete.') from e
  return data[3:] if data.startswith(b'\xef\xbb\xbf') else data


def load_json(data: bytes, where: str) -> Any:
  try:
    return json.loads(data.decode('utf-8'))
  except UnicodeDecodeError as e:
    raise FeatureError(f'{where}: not UTF-8 (byte {e.start}); save it as UTF-8 JSON.') from None
  except json.JSONDecodeError as e:
    raise FeatureError(f'{where}: invalid JSON ({e.msg} at line {e.lineno} column '
                       f'{e.colno}).') from None
  except RecursionError:
    raise FeatureError(f'{where}: JSON nested too deeply to read.') from None
  except ValueError as e:
    raise FeatureError(f'{where}: unreadable JSON value ({e}).') from None


def json_lines(data: bytes, path: str) -> Iterator[tuple[str, Any]]:
  """``(where, value or FeatureError)`` per non-blank line: a bad line is the caller's to skip."""
  for lineno, raw in enumerate(data.split(b'\n'), start=1):
    if raw.strip():
      where = f'{path} line {lineno}'
      try:
        yield where, load_json(raw, where)
      except FeatureError as e:
        yield where, e
