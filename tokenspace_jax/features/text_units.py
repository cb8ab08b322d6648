"""Which pieces of a text become examples: words by Unicode rules, never invisible pieces.

The labeler asks about *a word in its text*, so an example must be something a reader sees as a
word. Model tokens are not: a byte-level tokenizer splits a Hebrew or Arabic word into one token
per letter (or per byte), and English words into sub-words; a token can be only a zero-width
joiner or a bidi override. So:

* letters, marks and digits of scripts written with spaces (Latin, Cyrillic, Greek, Hebrew,
  Arabic, Hangul, Devanagari, ...) form words over token boundaries, the way Unicode's word
  boundaries (UAX #29) do: an apostrophe or period between letters (``don't``, ``e.g``) and a
  period, comma or semicolon between digits (``3.5``, ``1,000``) stay inside the word;
* scripts written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar, Tibetan) give no word
  boundaries to go by, so there each model token's run of characters is one example, as are
  runs of punctuation and symbols;
* combining marks, variation selectors and the joiners ZWJ/ZWNJ belong to the character before
  them; other format characters (Unicode category Cf: bidi controls, zero-width space, ...),
  whitespace and control characters separate pieces and are never part of one.
"""

from __future__ import annotations

import unicodedata

Span = tuple[int, int]

_SPACE, _INVISIBLE, _WORD, _TOKEN_RUN = 0, 1, 2, 3
_JOINERS = frozenset('\u200c\u200d\u00ad')  # ZWNJ, ZWJ, soft hyphen: inside words, unseen
_MID_LETTER = frozenset("'.\u2019\u00b7")
_MID_NUMBER = frozenset('.,;')
_NO_SPACE_SCRIPTS = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x19E0, 0x19FF),  # Khmer symbols
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi
    (0x3005, 0x3007),  # ideographic iteration mark, closing mark, number zero
    (0x3021, 0x3029),  # Hangzhou numerals
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x20000, 0x3FFFF),  # CJK extensions B onwards
)


def _no_space_script(c: str) -> bool:
  o = ord(c)
  return any(lo <= o <= hi for lo, hi in _NO_SPACE_SCRIPTS)


def _classes(text: str) -> list[int]:
  classes = []
  for c in text:
    cat = unicodedata.category(c)
    if c in _JOINERS or cat[0] == 'M':
      prev = classes[-1] if classes else _SPACE
      classes.append(prev if prev in (_WORD, _TOKEN_RUN) else _INVISIBLE)
    elif c.isspace() or cat in ('Zs', 'Zl', 'Zp', 'Cc'):
      classes.append(_SPACE)
    elif cat[0] == 'C':  # Cf format, Co private use, Cn unassigned, Cs surrogates
      classes.append(_INVISIBLE)
    elif _no_space_script(c):
      classes.append(_TOKEN_RUN)
    elif cat[0] in 'LN' or cat == 'Pc':
      classes.append(_WORD)
    else:
      classes.append(_TOKEN_RUN)
  for i in range(1, len(text) - 1):  # UAX #29 MidLetter / MidNum inside words.
    c = text[i]
    if classes[i - 1] == _WORD and classes[i + 1] == _WORD and classes[i] == _TOKEN_RUN:
      before, after = text[i - 1], text[i + 1]
      if ((c in _MID_LETTER and before.isalpha() and after.isalpha())
          or (c in _MID_NUMBER and before.isdigit() and after.isdigit())):
        classes[i] = _WORD
  return classes


def _extends(c: str) -> bool:
  return c in _JOINERS or unicodedata.category(c)[0] == 'M'


def _trim(text: str, s: int, e: int) -> Span | None:
  while s < e and text[s] in _JOINERS:
    s += 1
  while e > s and text[e - 1] in _JOINERS:
    e -= 1
  return (s, e) if s < e else None


def example_spans(text: str, token_spans: list[Span]) -> list[Span]:
  """The character spans of ``text`` that become examples, in order, not overlapping.

  ``token_spans`` (the labeling model's tokens) cut runs of space-less scripts and punctuation;
  words of spaced scripts ignore them.
  """
  classes = _classes(text)
  cuts = set()
  for s, e in token_spans:
    cuts.add(s)
    cuts.add(e)
  # A mark or joiner stays with its base character even where a token boundary falls between.
  cuts = {c for c in cuts if 0 < c < len(text) and not _extends(text[c])}
  spans = []
  i, n = 0, len(text)
  while i < n:
    cls = classes[i]
    if cls in (_SPACE, _INVISIBLE):
      i += 1
      continue
    j = i + 1
    while j < n and classes[j] == cls and not (cls == _TOKEN_RUN and j in cuts):
      j += 1
    span = _trim(text, i, j)
    if span is not None:
      spans.append(span)
    i = j
  return spans
