"""The frozen model used as a classifier: cached prefixes once, then the short tail per query.

``prefix_caches`` runs every example's prompt up to the concept slot once, keeping its key/value
cache and the model's own next-token distribution at the slot (the naturalness prior ``q``).
``answer_log_probs`` then runs only [label slot, tail tokens] on top of those caches: this is the
part that a descent step differentiates, and what evaluation of a fixed token reuses.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.models.kv_cache import KVCache, PrefixCache
from tokenspace_jax.models.llama import Llama


class PrefixCaches(flax.struct.PyTreeNode):
  """Every example's prompt up to the slot, as keys/values; the shared part stored once.

  ``shared_k``/``shared_v`` (None when the prompts share no tokens) hold the tokens every prompt
  starts with; ``k``/``v`` each example's own tokens after them, left-padded. Storing the shared
  part once, rather than in every example's cache, makes the caches several times smaller, and a
  step attends it as one matrix for the whole batch instead of gathering it per example.
  """

  k: jax.Array  # [layers, examples, W, kv_heads, head_dim]: own tokens
  v: jax.Array
  valid: jax.Array  # [examples, W]
  log_prior: jax.Array  # [examples, V]: log q, the model's next-token distribution at the slot
  shared_k: jax.Array | None = None  # [layers, S, kv_heads, head_dim]
  shared_v: jax.Array | None = None

  def take(self, idx: jax.Array) -> PrefixCache:
    """The caches of examples ``idx`` as a read-only PrefixCache for a block that follows them.

    Nothing is copied here: each layer reads its rows of ``k``/``v`` in place (see PrefixCache).
    """
    return PrefixCache(shared_k=self.shared_k, shared_v=self.shared_v, k=self.k, v=self.v,
                       valid=jnp.take(self.valid, idx, axis=0), rows=idx)


def prefix_caches(model: Llama, params, shared_ids: np.ndarray, prefix_ids: np.ndarray,
                  prefix_mask: np.ndarray, chunk: int = 16, cache_dtype=None) -> PrefixCaches:
  """Caches and priors for all examples, computed in jitted chunks of a fixed size.

  The part every prompt shares (``shared_ids``: instructions, few-shot examples) is run once
  and copied into each chunk's cache; only each example's own tokens are computed per example.
  The result keeps the shared part once (``shared_k``) and each example's own, left-padded
  tokens (``k``).
  """
  n, width = prefix_ids.shape
  n_shared = len(shared_ids)
  cache_dtype = cache_dtype or model.dtype
  capacity = n_shared + width

  @jax.jit
  def run_shared(params, ids):
    cache = KVCache.empty(model.config, 1, capacity, cache_dtype)
    _, cache = model.apply({'params': params}, ids[None], cache=cache, return_hidden=True)
    return cache

  @jax.jit
  def run(params, shared: KVCache, ids, mask):
    batch = ids.shape[0]
    grow = lambda x: jnp.broadcast_to(x, (x.shape[0], batch, *x.shape[2:]))
    cache = KVCache(k=grow(shared.k), v=grow(shared.v),
                    valid=jnp.broadcast_to(shared.valid, (batch, capacity)), end=shared.end)
    hidden, cache = model.apply({'params': params}, ids, input_mask=mask, cache=cache,
                                return_hidden=True)
    logits = model.apply({'params': params}, hidden[:, -1], method=Llama.logits)
    own = lambda x: x[:, :, n_shared:]
    return (own(cache.k), own(cache.v), cache.valid[:, n_shared:],
            jax.nn.log_softmax(logits, axis=-1))

  shared = (run_shared(params, jnp.asarray(shared_ids)) if n_shared
            else KVCache.empty(model.config, 1, capacity, cache_dtype))
  ks, vs, valids, priors = [], [], [], []
  for start in range(0, n, chunk):
    ids, mask = prefix_ids[start:start + chunk], prefix_mask[start:start + chunk]
    real = ids.shape[0]
    if real < chunk:  # pad the last chunk so every call has one shape
      ids = np.concatenate([ids, np.repeat(ids[-1:], chunk - real, 0)])
      mask = np.concatenate([mask, np.repeat(mask[-1:], chunk - real, 0)])
    k, v, valid, prior = run(params, shared, ids, mask)
    ks.append(k[:, :real])
    vs.append(v[:, :real])
    valids.append(valid[:real])
    priors.append(prior[:real])
  first = lambda x: x[:, 0, :n_shared] if n_shared else None
  return PrefixCaches(k=jnp.concatenate(ks, 1), v=jnp.concatenate(vs, 1),
                      valid=jnp.concatenate(valids, 0), log_prior=jnp.concatenate(priors, 0),
                      shared_k=first(shared.k), shared_v=first(shared.v))


def answer_log_probs(model: Llama, params, cache: KVCache | PrefixCache,
                     label_embeddings: jax.Array, tail_ids: jax.Array, answer_ids: jax.Array,
                     answer_bias: jax.Array, full_vocab: bool) -> jax.Array:
  """log P(yes), log P(no) [batch, 2] after [label slot(s), tail] on top of ``cache``.

  ``label_embeddings`` is [K, hidden] (one label for the batch) or [batch, K, hidden].
  ``answer_bias`` is added to the yes-logit. With ``full_vocab`` the answer distribution is the
  softmax over the whole vocabulary (as in the paper); otherwise over the two answers only.
  """
  batch = cache.valid.shape[0]
  if label_embeddings.ndim == 2:
    label_embeddings = jnp.broadcast_to(label_embeddings, (batch, *label_embeddings.shape))
  tail = jnp.take(params['embed'], tail_ids, axis=0).astype(label_embeddings.dtype)
  tail = jnp.broadcast_to(tail, (batch, *tail.shape))
  x = jnp.concatenate([label_embeddings, tail], axis=1)
  hidden, _ = model.apply({'params': params}, embeddings=x, cache=cache, return_hidden=True)
  last = hidden[:, -1]
  bias = jnp.stack([answer_bias, jnp.zeros_like(answer_bias)])
  if full_vocab:
    logits = model.apply({'params': params}, last, method=Llama.logits)
    logits = logits.at[:, answer_ids[0]].add(answer_bias)
    return jnp.take(jax.nn.log_softmax(logits, axis=-1), answer_ids, axis=1)
  logits = model.apply({'params': params}, last, answer_ids, method=Llama.logits) + bias
  return jax.nn.log_softmax(logits, axis=-1)
