"""Token strings as SAE tools export them, turned back into the text the model read.

Tokenizers store their pieces in private alphabets. Byte-level BPE (GPT-2, Llama 3, SmolLM, ...)
writes every byte as a printable character: the space as ``Ġ``, the newline as ``Ċ``, the tab as
``ĉ``, and each byte of a multi-byte character as a Latin-1 lookalike (``é`` is ``Ã©``, and may
be split over two tokens). SentencePiece writes the space as ``▁`` and bytes it has no piece for
as ``<0xNN>``. A dashboard that exports those raw pieces gives tokens that spell no text a person
(or the labeling model) would read, and labeling such text would label the tokenizer's alphabet.

:func:`normalize_tokens` undoes either alphabet, merges the pieces of one character into one
token (with the larger activation, as the labeler treats them as one anyway), and refuses what it
cannot undo, naming the record, rather than passing garbled text on.
"""

from __future__ import annotations

import functools
import re

from tokenspace_jax.features.example import FeatureError

SCHEMES = ('auto', 'byte_level', 'sentencepiece', 'plain')

_SENTENCEPIECE_SPACE = '\u2581'  # ▁
_BYTE_PIECE = re.compile(r'<0x([0-9A-Fa-f]{2})>')
_BPE_MARKERS = frozenset('\u0120\u010a\u0109')  # Ġ Ċ ĉ: space, newline, tab
_REPLACEMENT = '\ufffd'


@functools.cache
def _byte_alphabet() -> dict[str, int]:
  """GPT-2's byte-to-unicode table, inverted: printable bytes stand for themselves, the others
  (controls, space, DEL, NBSP, soft hyphen) are shifted to U+0100 onwards in byte order."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  table, shift = {}, 0
  for b in range(256):
    if b in printable:
      table[chr(b)] = b
    else:
      table[chr(256 + shift)] = b
      shift += 1
  return table


def detect_scheme(tokens: list[str]) -> str:
  """``'sentencepiece'``, ``'byte_level'`` or ``'plain'``: which alphabet ``tokens`` are in.

  Markers decide when present. Without them, tokens made only of byte symbols whose bytes decode
  to other UTF-8 text (``Ã©`` for ``é``) are byte-level too: that is mojibake, not text.
  """
  joined = ''.join(tokens)
  if _SENTENCEPIECE_SPACE in joined or any(_BYTE_PIECE.fullmatch(t) for t in tokens):
    return 'sentencepiece'
  if _BPE_MARKERS.intersection(joined):
    return 'byte_level'
  alphabet = _byte_alphabet()
  if not joined.isascii() and all(c in alphabet for c in joined):
    try:
      decoded = bytes(alphabet[c] for c in joined).decode('utf-8')
    except UnicodeDecodeError:
      return 'plain'
    if decoded != joined:
      return 'byte_level'
  return 'plain'


def normalize_tokens(tokens: list[str], activations: list[float], where: str,
                     scheme: str = 'auto') -> tuple[list[str], list[float]]:
  """``(tokens, activations)`` in plain text: the tokens concatenate to the text they spell.

  Pieces of one character become one token with the largest of their activations. Raises
  :class:`FeatureError` naming ``where`` when the tokens cannot be undone (mixed alphabets, bytes
  that are not UTF-8, or U+FFFD left by decoding a split character piece by piece).
  """
  if scheme not in SCHEMES:
    raise FeatureError(f'Unknown token scheme {scheme!r}; use one of {", ".join(SCHEMES)}.')
  if len(tokens) != len(activations):
    raise FeatureError(f'{where}: {len(tokens)} tokens but {len(activations)} activations; the '
                       'lists must have the same length (one activation per token).')
  if scheme == 'auto':
    scheme = detect_scheme(tokens)
  if scheme == 'plain':
    for i, tok in enumerate(tokens):
      if _REPLACEMENT in tok:
        raise FeatureError(
            f'{where}: token {i} {tok!r} holds U+FFFD, left where a character split over '
            'tokens was decoded piece by piece: the text is lost. Export the token ids (with '
            'the tokenizer) or the raw pieces (with their Ġ/▁ markers) instead.')
    return list(tokens), list(activations)
  if scheme == 'sentencepiece':
    if _BPE_MARKERS.intersection(''.join(tokens)):
      raise FeatureError(f'{where}: the tokens mix SentencePiece (▁) and byte-level BPE (Ġ, Ċ) '
                         'markers, so no text can be recovered; export them from one tokenizer.')
    pieces = [_sentencepiece_bytes(t) for t in tokens]
  else:
    pieces = [_byte_level_bytes(t, i, where) for i, t in enumerate(tokens)]
  return tokens_from_bytes(pieces, activations, where, scheme)


def _sentencepiece_bytes(token: str) -> bytes:
  m = _BYTE_PIECE.fullmatch(token)
  if m:
    return bytes([int(m.group(1), 16)])
  return token.replace(_SENTENCEPIECE_SPACE, ' ').encode('utf-8', 'surrogatepass')


def _byte_level_bytes(token: str, index: int, where: str) -> bytes:
  alphabet = _byte_alphabet()
  try:
    return bytes(alphabet[c] for c in token)
  except KeyError as e:
    raise FeatureError(
        f'{where}: token {index} {token!r} mixes byte-level BPE markers (Ġ, Ċ) with a character '
        f'that is no byte symbol ({e.args[0]!r}), so its text cannot be recovered; export the '
        'tokens either all decoded or all raw.') from None


def token_bytes(token: str, scheme: str) -> bytes | None:
  """The bytes a ``'byte_level'`` or ``'sentencepiece'`` piece stands for; None if it is not
  one of that alphabet (for callers that only inspect, such as a trim of partial characters)."""
  if scheme == 'sentencepiece':
    return _sentencepiece_bytes(token)
  alphabet = _byte_alphabet()
  if all(c in alphabet for c in token):
    return bytes(alphabet[c] for c in token)
  return None


def tokens_from_bytes(pieces: list[bytes], activations: list[float], where: str,
                      scheme: str) -> tuple[list[str], list[float]]:
  """Text tokens of the byte pieces, those of one character merged (the max activation)."""
  tokens, acts = [], []
  buf, act = b'', None
  for piece, a in zip(pieces, activations, strict=True):
    buf += piece
    act = a if act is None else max(act, a)
    try:
      text = buf.decode('utf-8')
    except UnicodeDecodeError as e:
      if e.reason == 'unexpected end of data':
        continue  # The character goes on in the next piece.
      raise FeatureError(f'{where}: the {scheme} tokens spell bytes that are not UTF-8 text '
                         f'({e.reason}), so the text cannot be recovered; check that the tokens '
                         'are complete and come from one tokenizer.') from None
    tokens.append(text)
    acts.append(act)
    buf, act = b'', None
  if buf:
    raise FeatureError(f'{where}: the {scheme} tokens end inside a character (bytes not UTF-8 '
                       'text), so the text cannot be recovered; check that the tokens are '
                       'complete.')
  return tokens, acts
