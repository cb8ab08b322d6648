"""Classifier prompts, split at the concept slot into a per-example prefix and a shared tail.

Everything before the slot depends only on the example, so its key/value cache is computed once;
the tail (the slot, the end of the user turn, the assistant's answer prefix) is the same for
every example and is all that runs per descent step. The rendered text is split at a sentinel
rather than assembled by hand, so the model's own chat template (ChatML, Llama-3, ...) decides
the special tokens.

The label token is expected to carry its own leading space (`` animal``, as BPE vocabularies
spell words mid-sentence), so one space before the slot is moved out of the prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

_SLOT = '\u2063CONCEPT_SLOT\u2063'


class PromptError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class FewShot:
  text: str
  word: str
  concept: str
  answer: bool


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A classifier prompt. ``user`` holds ``{text}``, ``{word}`` and, last, ``{concept}``."""

  user: str
  yes: str
  no: str
  system: str = ''
  assistant_prefix: str = ''
  few_shot: tuple[FewShot, ...] = ()
  chat: bool = True  # render with the tokenizer's chat template; False: plain completion text

  def __post_init__(self):
    if '{concept}' not in self.user:
      raise PromptError('The user template needs a {concept} slot.')
    after = self.user.split('{concept}', 1)[1]
    if '{text}' in after or '{word}' in after:
      raise PromptError('{concept} must come after {text} and {word} in the user template: '
                        'only what precedes the slot can be cached.')


def _fill(template: str, text: str, word: str, concept: str) -> str:
  return template.replace('{text}', text).replace('{word}', word).replace('{concept}', concept)


def render(template: PromptTemplate, tokenizer, text: str, word: str, concept: str) -> str:
  """The full prompt text, up to where the answer token comes."""
  answer = lambda yes: (template.yes if yes else template.no)
  if template.chat:
    messages = [{'role': 'system', 'content': template.system}] if template.system else []
    for shot in template.few_shot:
      messages.append({'role': 'user',
                       'content': _fill(template.user, shot.text, shot.word, shot.concept)})
      messages.append({'role': 'assistant',
                       'content': template.assistant_prefix + answer(shot.answer)})
    messages.append({'role': 'user', 'content': _fill(template.user, text, word, concept)})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    return rendered + template.assistant_prefix
  parts = [template.system] if template.system else []
  for shot in template.few_shot:
    parts.append(_fill(template.user, shot.text, shot.word, shot.concept)
                 + template.assistant_prefix + answer(shot.answer))
  parts.append(_fill(template.user, text, word, concept) + template.assistant_prefix)
  return '\n\n'.join(parts)


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)['input_ids'])


def answer_ids(template: PromptTemplate, tokenizer) -> tuple[int, int]:
  """Token ids of the yes and no answers; each must be a single token."""
  ids = []
  for name, s in (('yes', template.yes), ('no', template.no)):
    toks = _encode(tokenizer, s)
    if len(toks) != 1:
      raise PromptError(f'The {name} answer {s!r} is {len(toks)} tokens for this tokenizer; it '
                        'must be exactly one (try with or without a leading space).')
    ids.append(toks[0])
  if ids[0] == ids[1]:
    raise PromptError('The yes and no answers are the same token.')
  return ids[0], ids[1]


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
  """Token ids of every example's prompt, in the three parts that are computed differently.

  ``shared_ids`` is the longest token prefix common to all examples (system message, few-shot
  turns): its cache is computed once for the whole set. ``prefix_ids`` holds each example's
  remaining tokens up to the slot, left-padded. ``tail_ids`` follows the slot.
  """

  shared_ids: np.ndarray  # [S] int32
  prefix_ids: np.ndarray  # [N, P] int32, left-padded
  prefix_mask: np.ndarray  # [N, P] bool
  tail_ids: np.ndarray  # [T] int32: the tokens after the slot, shared by all examples
  yes_id: int
  no_id: int
  # With contexts (``encode_prompts(contexts=...)``), each example's tokens after the shared part
  # are its context's (``context_ids`` [C, W_c], left-padded; a row of padding where a block has
  # fewer contexts than others) followed by its own (``prefix_ids``); ``context_of`` [N] names
  # each example's context.
  context_ids: np.ndarray | None = None
  context_mask: np.ndarray | None = None
  context_of: np.ndarray | None = None

  @property
  def own_lengths(self) -> np.ndarray:
    """[N] the number of tokens each example's cache holds after the shared part."""
    n = self.prefix_mask.sum(axis=1)
    if self.context_of is not None:
      n = n + self.context_mask.sum(axis=1)[self.context_of]
    return n


def common_prefix_length(seqs: Sequence[list[int]]) -> int:
  shortest = min(len(s) for s in seqs)
  n = 0
  while n < shortest and all(s[n] == seqs[0][n] for s in seqs):
    n += 1
  return n


OWN_PAD_AFTER_CONTEXT = 4


def left_padded(seqs: Sequence[list[int]], pad: int, multiple: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
  """Token lists as ids [N, W] and a mask, right-aligned, W a multiple of ``multiple``."""
  width = max(1, -(-max(len(p) for p in seqs) // multiple)) * multiple
  ids = np.full((len(seqs), width), pad, np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for i, p in enumerate(seqs):
    if p:
      ids[i, width - len(p):] = p
      mask[i, width - len(p):] = True
  return ids, mask


def split_contexts(rest: Sequence[list[int]], keys: Sequence, blocks: int = 1,
                   ) -> tuple[list[list[int]], np.ndarray, list[list[int]]]:
  """Each example's tokens ``rest`` split into a context shared with the examples of the same
  key in its block, and its own tokens after it.

  The examples are ``blocks`` equal runs (the data shards of a mesh); a context is shared only
  within a run, so every shard holds the contexts its examples read. A context is the longest
  token prefix its examples have in common, less at least one token of each (the slot's prior is
  read at an example's own last token): for several words asked of one text, the text and what
  precedes the word. Returns the contexts (``blocks`` runs of equal length, padded with empty
  ones), each example's context and its own tokens.
  """
  n = len(rest)
  if n % blocks:
    raise ValueError(f'{n} examples do not split into {blocks} equal blocks.')
  per = n // blocks
  runs = []
  for b in range(blocks):
    index: dict = {}
    for i in range(b * per, (b + 1) * per):
      index.setdefault(keys[i], []).append(i)
    runs.append(list(index.values()))
  local = max(len(r) for r in runs)
  contexts: list[list[int]] = []
  context_of = np.zeros(n, np.int32)
  own: list[list[int]] = [[] for _ in range(n)]
  for run in runs:
    for members in run:
      seqs = [rest[i] for i in members]
      length = min(common_prefix_length(seqs), min(len(s) for s in seqs) - 1)
      for i in members:
        context_of[i] = len(contexts)
        own[i] = rest[i][length:]
      contexts.append(list(seqs[0][:length]))
    contexts += [[] for _ in range(local - len(run))]
  return contexts, context_of, own


def encode_prompts(template: PromptTemplate, tokenizer, items: Sequence[tuple[str, str]],
                   pad_to_multiple: int = 16, contexts: Sequence | None = None,
                   blocks: int = 1) -> EncodedPrompts:
  """Tokenizes (text, word) pairs into a shared part, left-padded prefixes and the tail.

  ``contexts`` (one hashable key per item, e.g. its text) lets the examples of one key share a
  context block (``split_contexts``, within each of ``blocks`` equal runs of the items).
  """
  if not items:
    raise PromptError('No examples to encode.')
  prefixes, tail = [], None
  for text, word in items:
    rendered = render(template, tokenizer, text, word, _SLOT)
    if rendered.count(_SLOT) != 1:
      raise PromptError('The chat template dropped or repeated the concept slot.')
    before, after = rendered.split(_SLOT)
    if before.endswith(' '):
      before = before[:-1]
    ids = _encode(tokenizer, after)
    if tail is None:
      tail = ids
    elif ids != tail:
      raise PromptError('The text after the concept slot differs between examples; the slot '
                        'must be the last example-dependent part of the prompt.')
    prefixes.append(_encode(tokenizer, before))
  # Every example keeps at least one token of its own: the slot's prior is read there.
  shared = min(common_prefix_length(prefixes), min(len(p) for p in prefixes) - 1)
  rest = [p[shared:] for p in prefixes]
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  context = {}
  if contexts is not None:
    ctx, context_of, rest = split_contexts(rest, contexts, blocks)
    ctx_ids, ctx_mask = left_padded(ctx, pad, pad_to_multiple)
    context = dict(context_ids=ctx_ids, context_mask=ctx_mask, context_of=context_of)
  # An example's own tokens after a context are few (the word and what follows it), so they are
  # padded more finely: at 16 most of them would be padding.
  prefix_ids, mask = left_padded(rest, pad, pad_to_multiple if contexts is None
                                  else OWN_PAD_AFTER_CONTEXT)
  yes_id, no_id = answer_ids(template, tokenizer)
  return EncodedPrompts(np.asarray(prefixes[0][:shared], np.int32), prefix_ids, mask,
                        np.asarray(tail, np.int32), yes_id, no_id, **context)


def template_from_config(cfg) -> PromptTemplate:
  """A PromptTemplate from the ``config.prompt`` ConfigDict."""
  shots = tuple(FewShot(s['text'], s['word'], s['concept'], bool(s['answer']))
                for s in (cfg.get('few_shot') or ()))
  return PromptTemplate(user=cfg.user, yes=cfg.yes, no=cfg.no, system=cfg.get('system', ''),
                        assistant_prefix=cfg.get('assistant_prefix', ''), few_shot=shots,
                        chat=bool(cfg.get('chat', True)))
