"""Greedy decoding with the KV cache: enough to check a loaded model talks sense.

Prompts are left-padded so that every row's last prompt token sits in the same column; the cache is
sized once for prompt plus answer, so the prompt is one jitted call and every decoding step is the
same jitted call on the same shapes (one compilation however many tokens are generated). Sampling,
beam search and the like are deliberately absent: labeling only needs a deterministic smoke test.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.models.kv_cache import KVCache
from tokenspace_jax.models.llama import Llama


# The empty cache comes in as an argument: built inside the jit, its zeros would be constants,
# and XLA spends seconds folding the attention over them at every new prompt length.
@functools.partial(jax.jit, static_argnames=('model',), donate_argnames=('cache',))
def _prefill(model: Llama, params, tokens, input_mask, cache: KVCache):
  # Hidden states, then the head on the last column only: full [batch, T, vocab] logits of a long
  # prompt would be the largest array of the whole call and only one column of it is used.
  hidden, cache = model.apply({'params': params}, tokens, input_mask=input_mask, cache=cache,
                              return_hidden=True)
  logits = model.apply({'params': params}, hidden[:, -1], method=Llama.logits)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=('model',), donate_argnames=('cache',))
def _decode_step(model: Llama, params, cache: KVCache, last, done, eos_id):
  logits, cache = model.apply({'params': params}, last[:, None], cache=cache)
  nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  # A finished row keeps emitting eos, so the batch shape never changes.
  nxt = jnp.where(done, eos_id, nxt)
  return nxt, cache, done | (nxt == eos_id)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, mask) [batch, longest] with each prompt flush right; the pad id is never attended."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('Every prompt needs at least one token.')
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    mask[i, width - len(p):] = True
  return tokens, mask


def greedy_generate(model: Llama, params, tokenizer: Any | None,
                    prompt_ids: Sequence[Sequence[int]] | Sequence[int], max_new_tokens: int,
                    eos_id: int | None = None) -> list[list[int]]:
  """Greedy continuation of each prompt; returns only the new tokens, one list per prompt.

  A single prompt (a flat list of ids) is treated as a batch of one. ``eos_id`` defaults to the
  tokenizer's eos token; a row stops after emitting it (the eos is included, as transformers'
  ``generate`` does), and decoding stops when every row has. With no eos at all every row gets
  exactly ``max_new_tokens`` tokens.
  """
  single = len(prompt_ids) > 0 and np.ndim(prompt_ids[0]) == 0
  prompts = [[int(t) for t in p] for p in ([prompt_ids] if single else prompt_ids)]
  if eos_id is None and tokenizer is not None:
    eos_id = tokenizer.eos_token_id
  if max_new_tokens <= 0:
    return [[] for _ in prompts]
  tokens, mask = left_pad(prompts)
  capacity = tokens.shape[1] + max_new_tokens
  # -1 never matches a token id, so "no eos" needs no separate compiled variant.
  eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
  cache = KVCache.empty(model.config, len(prompts), capacity, dtype=model.dtype)
  last, cache = _prefill(model, params, jnp.asarray(tokens), jnp.asarray(mask), cache)
  done = last == eos
  out = [last]
  for _ in range(max_new_tokens - 1):
    if bool(done.all()):
      break
    last, cache, done = _decode_step(model, params, cache, last, done, eos)
    out.append(last)
  steps = np.asarray(jnp.stack(out, axis=1))
  result = []
  for row in steps.tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    result.append(row)
  return result


def chat_prompt_ids(tokenizer, user_message: str) -> list[int]:
  """The ids of a one-turn chat ready for the assistant's answer, per the model's own template."""
  ids = tokenizer.apply_chat_template([{'role': 'user', 'content': user_message}],
                                      add_generation_prompt=True)
  # transformers 5 returns a BatchEncoding (a dict) where 4.x returned the list of ids.
  if hasattr(ids, 'keys'):
    ids = ids['input_ids']
  ids = list(np.asarray(ids).reshape(-1).tolist())
  return ids


def chat(loaded_model, user_message: str, max_new_tokens: int = 64) -> str:
  """The model's greedy answer to one user message; for eyeballing that a model loaded right."""
  tok = loaded_model.tokenizer
  if tok is None:
    raise ValueError('chat needs a tokenizer; load the model with with_tokenizer=True.')
  ids = chat_prompt_ids(tok, user_message)
  (new,) = greedy_generate(loaded_model.model, loaded_model.params, tok, ids, max_new_tokens)
  return tok.decode(new, skip_special_tokens=True)
