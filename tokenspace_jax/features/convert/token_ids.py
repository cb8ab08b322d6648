"""Token ids of an SAE's model to record fields, and that model's tokenizer found offline.

A latent cache (delphi's) or an array of activations (SAELens) holds token ids of the model the
SAE was trained on. When that tokenizer is the labeling model's, the ids are kept
(``text`` + ``token_ids``: exact, nothing re-derived). Otherwise the ids are turned into token
strings through the tokenizer's own alphabet (byte-level BPE or SentencePiece pieces, undone by
:mod:`tokenspace_jax.features.token_markers`) and records.py aligns them to the labeling model
by character offsets. Special tokens (BOS, EOS, padding) are dropped: they are no text of the
context. A window cut at a fixed number of tokens can start or end inside a character; those
partial tokens are trimmed rather than decoded to U+FFFD.
"""

from __future__ import annotations

import os
from typing import Any

from tokenspace_jax.features.example import FeatureError
from tokenspace_jax.features.token_markers import normalize_tokens, token_bytes, tokens_from_bytes


def load_tokenizer_for(spec: Any, model_name: str | None, where: str) -> Any:
  """The SAE model's tokenizer: ``spec`` (a tokenizer, a path, or ``'default'``), else the
  model named by the cache, if transformers can load it without a network."""
  if spec is not None and not isinstance(spec, (str, os.PathLike)):
    return spec
  from tokenspace_jax.models.tokenizer import load_tokenizer
  if spec == 'default':
    from tokenspace_jax.models.default import default_gguf_path
    return load_tokenizer(default_gguf_path())
  if spec:
    if not os.path.exists(spec):
      raise FeatureError(f'Tokenizer {str(spec)!r} not found; pass an HF folder, a .gguf file, '
                         'or "default" (the embedded SmolLM2).')
    try:
      return load_tokenizer(str(spec))
    except Exception as e:  # transformers raises many types for a folder it cannot read
      raise FeatureError(f'Cannot load the tokenizer in {str(spec)!r} ({type(e).__name__}: '
                         f'{str(e)[:200]}); pass an HF folder with tokenizer.json, or a .gguf '
                         'file.') from None
  if not model_name:
    raise FeatureError(f'{where}: names no model, so its tokenizer is unknown; pass '
                       '--tokenizer=PATH (an HF folder or .gguf file, or "default").')
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(model_name, local_files_only=True)
  except Exception as e:  # not in the local HF cache: OSError, ValueError, ...
    raise FeatureError(
        f'{where}: the tokenizer of {model_name!r} cannot be loaded offline '
        f'({type(e).__name__}); pass --tokenizer=PATH (an HF folder or .gguf file of that '
        'model\'s tokenizer, or "default" for the embedded SmolLM2).') from None


def same_vocabulary(a: Any, b: Any) -> bool:
  return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def piece_scheme(tokenizer: Any) -> str:
  """``'byte_level'`` or ``'sentencepiece'`` when the tokenizer's pieces undo to its own
  decoding; ``'decode'`` otherwise (then each window is decoded prefix by prefix)."""
  probe = ' a\nb café 红'
  ids = tokenizer(probe, add_special_tokens=False)['input_ids']
  pieces = tokenizer.convert_ids_to_tokens(ids)
  joined = ''.join(pieces)
  scheme = ('byte_level' if 'Ġ' in joined or 'Ċ' in joined else
            'sentencepiece' if '▁' in joined else 'decode')
  if scheme != 'decode':
    try:
      text = ''.join(normalize_tokens(pieces, [0.0] * len(pieces), 'probe', scheme)[0])
    except FeatureError:
      return 'decode'
    if text.strip() != tokenizer.decode(ids).strip():
      return 'decode'
  return scheme


class IdDecoder:
  """Record fields (``tokens`` or ``text`` + ``token_ids``, and ``activations``) of windows of
  the SAE tokenizer's ids; ``labeling_tokenizer`` decides whether ids are kept."""

  def __init__(self, tokenizer: Any, labeling_tokenizer: Any = None):
    self.tokenizer = tokenizer
    self.keep_ids = labeling_tokenizer is not None and same_vocabulary(tokenizer,
                                                                       labeling_tokenizer)
    self.special = frozenset(tokenizer.all_special_ids)
    self.scheme = piece_scheme(tokenizer)
    self._pieces: dict[int, str] = {}
    self._bytes: dict[int, bytes | None] = {}
    self._vocab = len(tokenizer)

  def _piece(self, i: int) -> str:
    p = self._pieces.get(i)
    if p is None:
      p = self._pieces[i] = self.tokenizer.convert_ids_to_tokens(i)
    return p

  def _piece_bytes(self, i: int) -> bytes | None:
    b = self._bytes.get(i, False)
    if b is False:
      b = self._bytes[i] = token_bytes(self._piece(i), self.scheme)
    return b

  def fields(self, ids: list[int], acts: list[float], where: str) -> dict:
    for i in ids:
      if not 0 <= i < self._vocab:
        raise FeatureError(f'{where}: token id {i} is outside the tokenizer\'s vocabulary '
                           f'[0, {self._vocab}); pass the tokenizer of the model the cache was '
                           'made with (--tokenizer=PATH).')
    kept = [(i, a) for i, a in zip(ids, acts, strict=True) if i not in self.special]
    ids, acts = [i for i, _ in kept], [a for _, a in kept]
    if self.scheme == 'decode':
      if not ids:
        raise FeatureError(f'{where}: no text (only special tokens).')
      if self.keep_ids:
        return {'text': self.tokenizer.decode(ids), 'token_ids': ids, 'activations': acts}
      return self._decoded(ids, acts, where)
    pieces = [self._piece_bytes(i) for i in ids]
    if any(p is None for p in pieces):
      bad = ids[[p is None for p in pieces].index(True)]
      raise FeatureError(f'{where}: token {bad} ({self._piece(bad)!r}) is not a {self.scheme} '
                         'piece, so its text is unknown.')
    start, end = self._whole_characters(pieces)
    ids, acts, pieces = ids[start:end], acts[start:end], pieces[start:end]
    if not ids:
      raise FeatureError(f'{where}: no text (only special tokens).')
    if self.keep_ids:
      return {'text': self.tokenizer.decode(ids), 'token_ids': ids, 'activations': acts}
    tokens, acts = tokens_from_bytes(pieces, acts, where, self.scheme)
    return {'tokens': tokens, 'activations': acts}

  @staticmethod
  def _whole_characters(pieces: list[bytes]) -> tuple[int, int]:
    """``[start, end)`` of the pieces without a character cut off at either edge."""
    start = 0
    while start < len(pieces) and pieces[start] and pieces[start][0] & 0xC0 == 0x80:
      start += 1  # Starts with a continuation byte: the rest of a character cut off before.
    end = len(pieces)
    for _ in range(4):  # A UTF-8 character has at most 4 bytes.
      try:
        b''.join(pieces[start:end]).decode('utf-8')
        break
      except UnicodeDecodeError as e:
        if e.reason != 'unexpected end of data' or end <= start:
          break  # Bad bytes inside: tokens_from_bytes names them.
        end -= 1
    return start, end

  def _decoded(self, ids: list[int], acts: list[float], where: str) -> dict:
    text = self.tokenizer.decode(ids)
    tokens, out_acts, pos, act = [], [], 0, None
    for k, a in enumerate(acts):
      prefix = self.tokenizer.decode(ids[:k + 1])
      n = 0
      while n < min(len(prefix), len(text)) and prefix[n] == text[n]:
        n += 1
      act = a if act is None else max(act, a)
      if n > pos or k == len(acts) - 1:
        tokens.append(text[pos:max(n, pos)] if k < len(acts) - 1 else text[pos:])
        out_acts.append(act)
        pos, act = max(n, pos), None
    tokens, out_acts = normalize_tokens(tokens, out_acts, where, 'plain')
    return {'tokens': tokens, 'activations': out_acts}
