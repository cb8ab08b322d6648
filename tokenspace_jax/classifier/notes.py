"""The judge's own reading of each text, written into the classifier prompt after the text.

Asked about one word, Qwen2.5-Coder-1.5B judges a language by its script: it calls the Japanese
東京 "a Chinese word", and no name of Chinese makes it say "no" to Japanese words in kanji. Asked
which language a whole text is written in, it answers right. So the prompt can carry what the
model reads off the text: each distinct text is put to the judge once, greedily, before any
prompt is cached, and its answer follows the text in every prompt about a word of that text
(``prompt.note``; docs/method.md, "A note on the text"). The note is the model's, not the
feature's: nothing about the feature or its labels goes into the question.

The questions are read as the classifier's prompts are (``classifier.prefix.prefix_caches``):
the chat turn's tokens before the text, the same for every text, run once; each text's own
tokens on top of them; the answer's first token is the most probable next token there. Further
tokens run on top of the same caches, only until every answer's first word is complete.
Generating each whole prompt from scratch, left-padded, computed about twice the tokens
(docs/results.md, "Notes on the texts read on the prefix pass").
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.classifier import prefix
from tokenspace_jax.classifier.prompts import PromptError, common_prefix_length, left_padded
from tokenspace_jax.config_defaults import PROMPT_NOTES
from tokenspace_jax.models.generate import chat_prompt_ids
from tokenspace_jax.models.llama import Llama

log = logging.getLogger('tokenspace_jax')

_ANSWER_TOKENS = 4  # a one-word answer; longer answers are cut to their first word
_UNKNOWN = 'unknown'
_TEXTS_PER_PASS = 256  # texts whose caches are held at once: bounds the memory of a big job
# Rows of a pass after the first token: one token each, so a pass is as long as reading the
# weights once, whatever its rows; few passes of many rows read them fewest times.
_ROWS_AFTER_FIRST = 128


def first_word(answer: str) -> str:
  """The first word of a generated answer, without its trailing punctuation."""
  words = answer.split()
  word = re.sub(r'[\s.,;:!?。，、！？"\'`*]+$', '', words[0]) if words else ''
  return word or _UNKNOWN


def _word_complete(answer: str) -> bool:
  """Whether more tokens can no longer change ``first_word(answer)``: a space follows it."""
  return re.match(r'\s*\S+\s', answer) is not None


def noted_text(text: str, note: str, answer: str) -> str:
  """The text as the classifier prompt shows it: followed by the judge's note on it."""
  return f'{text}\n{PROMPT_NOTES[note][2].format(answer=answer)}'


@functools.partial(jax.jit, static_argnames=('model',))
def _next_tokens(model: Llama, params, caches: prefix.PrefixCaches, rows, ids):
  """The greedy next token [rows] after tokens ``ids`` [rows, j] on top of the rows' caches."""
  hidden, _ = model.apply({'params': params}, ids, cache=caches.take(rows), return_hidden=True)
  logits = model.apply({'params': params}, hidden[:, -1], method=Llama.logits)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def read_texts(lm, texts: Sequence[str], note: str, batch: int = 32) -> dict[str, str]:
  """The judge's one-word answer to the note's question, for each distinct text.

  The answer is the first word of at most ``_ANSWER_TOKENS`` greedy tokens, as from generating
  each prompt whole; ``batch`` texts run per forward pass of the prompts.
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
  answers = {}
  for i in range(0, len(distinct), _TEXTS_PER_PASS):
    part = distinct[i:i + _TEXTS_PER_PASS]
    ids = [chat_prompt_ids(tok, question.format(text=t)) + start_ids for t in part]
    new = _greedy_words(lm, ids, batch)
    answers.update((t, first_word(tok.decode(n, skip_special_tokens=True)))
                   for t, n in zip(part, new, strict=True))
  log.info('prompt.note=%s: read %d texts in %.1f s', note, len(distinct),
           time.perf_counter() - start)
  return answers


def _greedy_words(lm, prompt_ids: list[list[int]], batch: int) -> list[list[int]]:
  """Greedy tokens after each prompt, up to ``_ANSWER_TOKENS`` and the eos, until every
  answer's first word is complete."""
  tok, model, params = lm.tokenizer, lm.model, lm.params
  # Every prompt keeps at least one token of its own: the prefix pass reads the next token
  # after each prompt's own last one.
  n_shared = min(common_prefix_length(prompt_ids), min(map(len, prompt_ids)) - 1)
  own_ids, own_mask = left_padded([p[n_shared:] for p in prompt_ids], 0, 8)
  caches = prefix.prefix_caches(model, params, np.asarray(prompt_ids[0][:n_shared], np.int32),
                                own_ids, own_mask, chunk=batch)
  first = np.asarray(jnp.argmax(caches.log_prior, axis=-1))
  caches = caches.replace(log_prior=None)
  new = [[int(t)] for t in first]
  eos = tok.eos_token_id
  done = lambda row: row[-1] == eos or _word_complete(tok.decode(row, skip_special_tokens=True))
  for _ in range(_ANSWER_TOKENS - 1):
    open_rows = np.asarray([i for i, row in enumerate(new) if not done(row)], np.int32)
    if not len(open_rows):
      break
    for j in range(0, len(open_rows), _ROWS_AFTER_FIRST):
      rows = open_rows[j:j + _ROWS_AFTER_FIRST]
      padded = np.concatenate([rows, np.repeat(rows[-1:], _ROWS_AFTER_FIRST - len(rows))])
      ids = np.asarray([new[r] for r in padded], np.int32)
      nxt = np.asarray(_next_tokens(model, params, caches, jnp.asarray(padded), jnp.asarray(ids)))
      for r, t in zip(rows, nxt, strict=False):
        new[r].append(int(t))
  return new
