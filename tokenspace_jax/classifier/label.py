"""The label being learned: logits over the vocabulary, as an Optax-optimisable pytree.

``p = softmax(logits / temperature)`` over the allowed tokens; the label embedding fed to the
model is ``p @ E``, a superposition of token embeddings that becomes a single token as ``p``
concentrates. An optional scalar ``answer_bias`` is added to the yes-logit: it absorbs the
model's overall yes/no tendency, so the label is pushed to *discriminate* instead of merely
shifting every answer towards the majority.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_DISALLOWED = -1e9


class LabelError(ValueError):
  pass


def init_label(cfg, vocab_size: int, rng: jax.Array, *, prior_logits: np.ndarray | None = None,
               word_id: int | None = None) -> dict:
  """Initial label pytree ``{'logits': [K, V], 'answer_bias': []}`` per ``config.label``.

  ``init`` is one of ``zeros`` (uniform p: no token favoured, so the entropy term cannot lock in
  whichever token happened to start highest), ``normal`` (N(0, init_scale)), ``prior`` (the
  model's own next-token log-probabilities at the slot) or ``word`` (``init_scale`` on one token).
  """
  shape = (cfg.num_tokens, vocab_size)
  if cfg.init == 'zeros':
    logits = jnp.zeros(shape)
  elif cfg.init == 'normal':
    logits = cfg.init_scale * jax.random.normal(rng, shape)
  elif cfg.init == 'prior':
    if prior_logits is None:
      raise LabelError('label.init="prior" needs the model prior at the slot.')
    logits = jnp.broadcast_to(jnp.asarray(prior_logits, jnp.float32), shape)
  elif cfg.init == 'word':
    if word_id is None:
      raise LabelError('label.init="word" needs label.init_word to name a token.')
    logits = jnp.zeros(shape).at[:, word_id].set(cfg.init_scale)
  else:
    raise LabelError(f'label.init={cfg.init!r} is not one of zeros, normal, prior, word.')
  return {'logits': logits.astype(jnp.float32), 'answer_bias': jnp.zeros((), jnp.float32)}


def probabilities(label: dict, allowed: jax.Array, temperature: float = 1.0) -> jax.Array:
  """p [K, V]; disallowed tokens get exactly zero probability."""
  logits = jnp.where(allowed, label['logits'] / temperature, _DISALLOWED)
  return jax.nn.softmax(logits, axis=-1)


def allowed_tokens(tokenizer, vocab_size: int) -> np.ndarray:
  """Tokens that can be a label: not special/control tokens, not byte pieces that decode to
  nothing printable, and not the padding rows some checkpoints add beyond the tokenizer."""
  allowed = np.zeros(vocab_size, bool)
  n = min(vocab_size, len(tokenizer))
  texts = tokenizer.batch_decode([[i] for i in range(n)])
  special = set(tokenizer.all_special_ids)
  for i, text in enumerate(texts):
    allowed[i] = (i not in special and bool(text.strip()) and '\ufffd' not in text
                  and text.isprintable())
  return allowed


def allowed_mask(tokenizer, vocab_size: int, mask_special: bool) -> np.ndarray:
  """``allowed_tokens``, or every token when ``label.mask_special`` is off."""
  return (allowed_tokens(tokenizer, vocab_size) if mask_special
          else np.ones(vocab_size, bool))


def reference_ids(tokenizer, user_template: str, word: str) -> tuple[list[int], str]:
  """(token ids, spelling) of a human reference word as the concept slot expects it.

  The spelling the slot expects first: with a leading space after "Concept:", bare after a
  quote. A spelling that is one token is preferred; otherwise the word is scored with all of its
  tokens filling the slot (a label of several tokens), never dropped.
  """
  word = word.strip()
  spaced = not user_template.split('{concept}')[0].endswith(('"', "'"))
  variants = [' ' + word, word] if spaced else [word, ' ' + word]
  encoded = [list(tokenizer(v, add_special_tokens=False)['input_ids']) for v in variants]
  for ids, variant in zip(encoded, variants, strict=True):
    if len(ids) == 1:
      return ids, variant
  return encoded[0], variants[0]


def token_id_for_word(tokenizer, word: str) -> int:
  ids = tokenizer(word, add_special_tokens=False)['input_ids']
  if len(ids) != 1:
    pieces = tokenizer.convert_ids_to_tokens(ids)
    raise LabelError(f'{word!r} is {len(ids)} tokens for this tokenizer ({pieces}); a single-token '
                     'label is needed (try with a leading space, e.g. " animal").')
  return ids[0]


def top_tokens(p_row: np.ndarray, tokenizer, k: int = 10) -> list[tuple[int, str, float]]:
  order = np.argsort(-p_row)[:k]
  return [(int(i), tokenizer.decode([int(i)]), float(p_row[i])) for i in order]
