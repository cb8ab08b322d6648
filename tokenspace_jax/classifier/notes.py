"""The judge's own reading of each text, written into the classifier prompt after the text.

Asked about one word, Qwen2.5-Coder-1.5B judges a language by its script: it calls the Japanese
東京 "a Chinese word", and no name of Chinese makes it say "no" to Japanese words in kanji. Asked
which language a whole text is written in, it answers right. So the prompt can carry what the
model reads off the text: each distinct text is put to the judge once, greedily, before any
prompt is cached, and its answer follows the text in every prompt about a word of that text
(``prompt.note``; docs/method.md, "A note on the text"). The note is the model's, not the
feature's: nothing about the feature or its labels goes into the question.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

from tokenspace_jax.classifier.prompts import PromptError
from tokenspace_jax.config_defaults import PROMPT_NOTES
from tokenspace_jax.models.generate import chat_prompt_ids, greedy_generate

log = logging.getLogger('tokenspace_jax')

_ANSWER_TOKENS = 4  # a one-word answer; longer answers are cut to their first word
_UNKNOWN = 'unknown'


def first_word(answer: str) -> str:
  """The first word of a generated answer, without its trailing punctuation."""
  words = answer.split()
  word = re.sub(r'[\s.,;:!?。，、！？"\'`*]+$', '', words[0]) if words else ''
  return word or _UNKNOWN


def noted_text(text: str, note: str, answer: str) -> str:
  """The text as the classifier prompt shows it: followed by the judge's note on it."""
  return f'{text}\n{PROMPT_NOTES[note][2].format(answer=answer)}'


def read_texts(lm, texts: Sequence[str], note: str, batch: int = 16) -> dict[str, str]:
  """The judge's one-word answer to the note's question, for each distinct text.

  Prompts of similar lengths are generated together, in batches of ``batch`` rows padded to a
  multiple of 32 tokens, so that a few compilations serve all of them.
  """
  if note not in PROMPT_NOTES:
    raise PromptError(f'Unknown prompt.note {note!r}; use one of '
                      f'{", ".join(map(repr, PROMPT_NOTES))}.')
  tok = lm.tokenizer
  if tok is None or not getattr(tok, 'chat_template', None):
    raise PromptError(f'prompt.note={note!r} asks the model a question in its chat template, and '
                      'this tokenizer has none; use an instruct model or set prompt.note="".')
  start = time.perf_counter()
  distinct = sorted(set(texts))
  question, answer_start, _ = PROMPT_NOTES[note]
  start_ids = tok.encode(answer_start, add_special_tokens=False)
  ids = {t: chat_prompt_ids(tok, question.format(text=t)) + start_ids for t in distinct}
  order = sorted(distinct, key=lambda t: len(ids[t]))
  answers = {}
  for i in range(0, len(order), batch):
    chunk = order[i:i + batch]
    rows = [ids[t] for t in chunk]
    rows += [rows[-1]] * (batch - len(rows))  # the same batch shape for every chunk
    out = greedy_generate(lm.model, lm.params, tok, rows, _ANSWER_TOKENS, pad_to_multiple=32)
    for text, new in zip(chunk, out, strict=False):
      answers[text] = first_word(tok.decode(new, skip_special_tokens=True))
  log.info('prompt.note=%s: read %d texts in %.1f s', note, len(distinct),
           time.perf_counter() - start)
  return answers
