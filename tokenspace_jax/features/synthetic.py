"""Built-in features with known ground truth, from hand-labeled sentences shipped as package data.

A label optimizer needs features whose right answer is known before it can be trusted on SAE
features whose answer is not. Each data file (``data/<name>.jsonl``) holds one sentence per line::

  {"text": "...", "positive": [[s, e], ...], "hard_negative": [[s, e], ...], "split": "train"}

``positive`` spans are words the feature fires on; ``hard_negative`` spans are words chosen to be
confusable with them (what separates a precise label from a vague one). Every other word of the
text is an ordinary ("easy") negative. The split is fixed in the file, not drawn at load time, so
held-out numbers are comparable across runs and machines.

Labeling conventions (kept consistent across the files, so a "wrong" label is the model's fault
and not the data's):

* ``chinese``: positives are the words of Chinese text (simplified or traditional; 1-4 characters
  each), in Chinese sentences and embedded in English ones. Hard negatives are Japanese words
  (kanji, kana or mixed, e.g. 東京, ありがとう) and Korean words. A string both languages write
  the same way (東京, 学生, 出口) is labeled by the language of its context: the feature is about
  Chinese *text*, so script alone must not decide.
* ``animal``: positives name animals of any class, plurals, young (cubs, joey) and category words
  (bird, insect) included, also when the animal is depicted (a carved horse, a cartoon panda).
  Hard negatives are plants, fungi, foods (animal foods too: grilled salmon, roast beef),
  objects, and animal words meaning something else (Jaguar the car, a computer mouse, a bull
  market, "bear in mind", geese *fly*). Words for people are ordinary words.
* ``mammal``: positives are mammals only (whale, bat and platypus included) and the word mammal.
  Hard negatives are all other animals: birds, fish (whale shark, catfish, dogfish), insects,
  reptiles, amphibians, invertebrates, and the category words bird, fish, insect.
* ``number``: positives are numerals (``42``, ``3.5``, ``1,000``, and years such as ``1999``,
  which are numerals too) and cardinal number words, including ``zero``, ``dozen``, ``hundred``,
  ``million`` and their plurals, and "one" as a count ("only one ticket"); hyphenated words like
  ``twenty-five`` are one span. Hard negatives are ordinals (``third``, ``21st``, ``last``), "one"
  as a pronoun ("no one", "the red one") and words like ``someone``, ``none``, ``nobody``, month
  and weekday names, frequency and multiplicative words (``once``, ``twice``, ``double``,
  ``single``), vague quantifiers (``several``, ``few``, ``many``) and words about numbers
  (``number``, ``digit``). Ambiguous cases (clock times, "half", "a couple") were left out of
  the texts rather than labeled by fiat.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import random
import re
import zlib

from tokenspace_jax.features.example import Example, Feature, FeatureError

SYNTHETIC_FEATURES: tuple[str, ...] = ('chinese', 'animal', 'mammal', 'number')
NEGATIVE_MODES: tuple[str, ...] = ('hard', 'natural', 'easy')

_REFERENCE_WORDS = {'chinese': 'Chinese', 'animal': 'animal', 'mammal': 'mammal',
                    'number': 'number'}
_DESCRIPTIONS = {
    'chinese': 'Fires on Chinese words; Japanese and Korean words are hard negatives.',
    'animal': 'Fires on words naming animals; plants, objects and animal-named things (Jaguar '
              'the car, a computer mouse) are hard negatives.',
    'mammal': 'Fires on words naming mammals; birds, fish, insects, reptiles and amphibians are '
              'hard negatives.',
    'number': 'Fires on numerals and cardinal number words; ordinals, the pronoun "one", months '
              'and weekdays are hard negatives.',
}

# Ordinary words per sentence in 'hard' mode: few enough that hard negatives stay a large share
# of the negatives, enough that the label is also tested against unrelated words.
_EASY_PER_SENTENCE = 2

# Words by script, so a Japanese sentence splits into kana and kanji runs rather than one blob.
_WORD_RE = re.compile(
    r"[A-Za-z\u00c0-\u024f]+(?:['\u2019-][A-Za-z\u00c0-\u024f]+)*"  # Latin words
    r'|\d+(?:[.,]\d+)*'  # numerals
    r'|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+'  # Han
    r'|[\u3040-\u30ff\u31f0-\u31ff]+'  # kana
    r'|[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]+')  # Hangul
# Function words make trivial negatives; the ordinary negatives we pick should be content words.
_STOPWORDS = frozenset(
    'the and for with that this these those was were are has have had from into but not our its '
    'his her their they them she you your who whom what which when where while all out over off '
    'than then there also just very about after before because been being can could would should '
    'will did does each every more most some such only own too any how why yet onto upon'.split())


def load_synthetic_feature(name: str, *, negatives: str = 'hard') -> Feature:
  """One built-in feature; the same object on every call (the data never changes at runtime).

  ``negatives`` picks which negatives the examples include:

  * ``'hard'``: every hard negative plus up to two ordinary words per sentence;
  * ``'natural'``: every other word of the texts, as a real activation dump would give
    (unbalanced, realistic);
  * ``'easy'``: no hard negatives; instead as many ordinary words per sentence as 'hard' takes
    negatives there (where the sentence has them), so only difficulty changes, not balance.
  """
  key = name.strip().lower() if isinstance(name, str) else name
  if key not in SYNTHETIC_FEATURES:
    raise FeatureError(f'Unknown synthetic feature {name!r}; the available ones are '
                       f'{", ".join(SYNTHETIC_FEATURES)}. For SAE features use load_records().')
  if negatives not in NEGATIVE_MODES:
    raise FeatureError(f'Unknown negatives mode {negatives!r}; use one of '
                       f'{", ".join(repr(m) for m in NEGATIVE_MODES)}.')
  return _build(key, negatives)


@functools.cache
def _build(name: str, negatives: str) -> Feature:
  splits: dict[str, list[Example]] = {'train': [], 'heldout': []}
  for lineno, row in enumerate(_read(name), start=1):
    splits[row['split']].extend(_sentence_examples(name, lineno, row, negatives))
  return Feature(name=name, reference_word=_REFERENCE_WORDS[name],
                 train=tuple(splits['train']), heldout=tuple(splits['heldout']),
                 description=_DESCRIPTIONS[name])


def _read(name: str) -> list[dict]:
  """Parsed and checked rows; a corrupt package file fails loudly here, not as odd labels later."""
  resource = importlib.resources.files('tokenspace_jax.features').joinpath('data', f'{name}.jsonl')
  rows = []
  for lineno, line in enumerate(resource.read_text(encoding='utf-8').splitlines(), start=1):
    if not line.strip():
      continue
    where = f'package data {name}.jsonl line {lineno}'
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise FeatureError(f'{where}: invalid JSON ({e.msg}); reinstall tokenspace_jax.') from e
    if row.get('split') not in ('train', 'heldout'):
      raise FeatureError(f'{where}: split must be "train" or "heldout", got {row.get("split")!r}.')
    text = row['text']
    for kind in ('positive', 'hard_negative'):
      for s, e in row.get(kind, []):
        if not (0 <= s < e <= len(text)) or text[s:e] != text[s:e].strip():
          raise FeatureError(f'{where}: bad {kind} span [{s}, {e}] for the text {text!r}; spans '
                             'must be non-empty, inside the text, and without outer whitespace.')
    rows.append(row)
  return rows


def _sentence_examples(name: str, lineno: int, row: dict, negatives: str) -> list[Example]:
  text = row['text']
  positive = [tuple(span) for span in row.get('positive', [])]
  hard = [tuple(span) for span in row.get('hard_negative', [])]
  marked = positive + hard
  ordinary = [m.span() for m in _WORD_RE.finditer(text)
              if not any(m.start() < e and s < m.end() for s, e in marked)]

  chosen_hard = [] if negatives == 'easy' else hard
  if negatives == 'natural':
    chosen_easy = ordinary
  else:
    budget = _EASY_PER_SENTENCE + (len(hard) if negatives == 'easy' else 0)
    seed = zlib.crc32(f'{name}:{lineno}'.encode())
    chosen_easy = _pick_ordinary(text, ordinary, budget, seed)

  window = lineno - 1  # One window per sentence: the scorer's unit for "does it hold a positive".
  examples = [Example(text, s, e, 1.0, 1.0, window=window) for s, e in positive]
  examples += [Example(text, s, e, 0.0, 0.0, hard_negative=True, window=window)
               for s, e in chosen_hard]
  examples += [Example(text, s, e, 0.0, 0.0, window=window) for s, e in chosen_easy]
  return sorted(examples, key=lambda ex: (ex.start, ex.end))


def _pick_ordinary(text: str, spans: list[tuple[int, int]], budget: int,
                   seed: int) -> list[tuple[int, int]]:
  """Up to ``budget`` ordinary words, content words first, chosen by a per-sentence seed."""
  content = [sp for sp in spans if _is_content(text[sp[0]:sp[1]])]
  rest = [sp for sp in spans if sp not in content]
  rng = random.Random(seed)
  rng.shuffle(content)
  rng.shuffle(rest)
  return (content + rest)[:budget]


def _is_content(word: str) -> bool:
  if word.isascii():
    return len(word) >= 3 and word.lower() not in _STOPWORDS
  return True  # A CJK run is a content word as far as these features are concerned.
