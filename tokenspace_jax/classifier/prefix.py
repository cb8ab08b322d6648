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
  # [examples, V]: log q, the model's next-token distribution at the slot. None once the pool has
  # averaged it per feature (``engine.pool``): a step reads only the mean, and on a 152k
  # vocabulary the per-example rows are a large share of the pool (docs/performance.md).
  log_prior: jax.Array | None
  shared_k: jax.Array | None = None  # [layers, S, kv_heads, head_dim]
  shared_v: jax.Array | None = None
  # [examples] the yes/no margin each example gets from labels that carry no information about
  # it (``engine.pool.contrast_baseline``); None: margins are used as the model gives them.
  baseline: jax.Array | None = None

  def answer_bias(self, bias: jax.Array, idx: jax.Array) -> jax.Array:
    """The yes-logit bias of examples ``idx``: the learned ``bias`` less each one's baseline.

    Subtracting the baseline makes the classifier's answer a measure of what the label adds:
    some examples draw a "yes" whatever the concept (a small model says yes to most common
    words), and without it that tendency, not the label, decides much of the ranking.
    """
    if self.baseline is None:
      return bias
    return bias - jnp.take(self.baseline, idx)

  def take(self, idx: jax.Array) -> PrefixCache:
    """The caches of examples ``idx`` as a read-only PrefixCache for a block that follows them.

    Nothing is copied here: each layer reads its rows of ``k``/``v`` in place (see PrefixCache).
    """
    return PrefixCache(shared_k=self.shared_k, shared_v=self.shared_v, k=self.k, v=self.v,
                       valid=jnp.take(self.valid, idx, axis=0), rows=idx)


def prefix_caches(model: Llama, params, shared_ids: np.ndarray, prefix_ids: np.ndarray,
                  prefix_mask: np.ndarray, chunk: int = 16, cache_dtype=None,
                  out_shardings=None, pad_to: int = 16) -> PrefixCaches:
  """Caches and priors for all examples, computed in jitted chunks of a fixed size.

  The part every prompt shares (``shared_ids``: instructions, few-shot examples) is run once,
  and each chunk's own tokens attend it as one matrix; only each example's own tokens are
  computed per example. The result keeps the shared part once (``shared_k``) and each
  example's own, left-padded tokens (``k``).

  Chunks are made of examples of similar length (sorted by their number of own tokens), and each
  runs only as wide as its longest example, rounded up to ``pad_to`` so that a feature compiles
  a few widths, not one per length: one feature's prompts vary in length, and at the common width
  (the longest prompt's) much of each chunk would be padding (docs/results.md, "Time").
  RoPE positions count real tokens only, so a narrower chunk computes the same caches; they are
  written back, right-aligned, at the common width the step reads, each example to its own row.

  Each chunk is written into preallocated buffers as soon as it is computed, so the caches are
  held once, never as chunks plus their concatenation. ``out_shardings`` (a function from the
  result's ``jax.ShapeDtypeStruct``s to a matching tree of shardings) places those buffers on a
  device mesh, so no device ever holds more than its share of the caches (Llama-3-8B's caches
  of a few hundred examples exceed one accelerator's memory); by default they are on the
  default device. ``cache_dtype`` is what the kept keys and values are stored in (default: the
  activation dtype): they are computed in the activation dtype and cast once, so bfloat16
  caches under float32 activations take half the memory and each step reads them widened.
  """
  n, width = prefix_ids.shape
  n_shared = len(shared_ids)
  cache_dtype = cache_dtype or model.dtype

  @jax.jit
  def run_shared(params, ids, cache):
    # The empty cache comes in as an argument: built inside, XLA would constant-fold its zeros
    # through the first layer (seconds of compile time, and a warning, per prompt length).
    _, cache = model.apply({'params': params}, ids[None], cache=cache, return_hidden=True)
    return cache.k[:, 0], cache.v[:, 0]

  @jax.jit
  def run(params, shared_k, shared_v, ids, mask):
    w = ids.shape[1]  # this chunk's width, at most the common one
    # Each prompt's own tokens attend the shared part as one matrix for the whole chunk: copying
    # it into every prompt's cache first cost a broadcast and a write of it per chunk.
    hidden, own = model.apply({'params': params}, ids, input_mask=mask,
                              cache=PrefixCache.shared_only(shared_k, shared_v),
                              return_hidden=True)
    logits = model.apply({'params': params}, hidden[:, -1], method=Llama.logits)
    # Back to the common width, right-aligned as the left-padded prompts are.
    store = lambda x: jnp.pad(x, ((0, 0), (0, 0), (width - w, 0), (0, 0), (0, 0))).astype(
        cache_dtype)
    valid = jnp.pad(own.valid, ((0, 0), (width - w, 0)))
    return store(own.k), store(own.v), valid, jax.nn.log_softmax(logits, axis=-1)

  # Computed in the activation dtype throughout; only what is kept is cast to ``cache_dtype``.
  shared_k = shared_v = None
  if n_shared:
    empty = KVCache.empty(model.config, 1, n_shared, model.dtype)
    shared_k, shared_v = run_shared(params, jnp.asarray(shared_ids), empty)
  writer = _ShardedWriter(n, *(None if x is None else x.astype(cache_dtype)
                               for x in (shared_k, shared_v)), out_shardings)
  lengths = np.asarray(prefix_mask).sum(axis=1)
  order = np.argsort(-lengths, kind='stable')
  for start in range(0, n, chunk):
    rows = order[start:start + chunk]
    if len(rows) < chunk:  # pad the last chunk with a repeated example: one batch size for all
      rows = np.concatenate([rows, np.repeat(rows[-1:], chunk - len(rows))])
    w = min(width, max(pad_to, -(-int(lengths[rows].max()) // pad_to) * pad_to))
    ids, mask = prefix_ids[rows, width - w:], prefix_mask[rows, width - w:]
    writer.write(rows, run(params, shared_k, shared_v, ids, mask))
  return writer.result()


class _ShardedWriter:
  """Chunks of (k, v, valid, log_prior) written into preallocated (sharded) buffers, in place."""

  _AXES = (1, 1, 0, 0)  # the example axis of k, v, valid, log_prior

  def __init__(self, n: int, shared_k, shared_v, out_shardings):
    self.n, self.shared = n, (shared_k, shared_v)
    self.out_shardings, self.buffers, self._write = out_shardings, None, None

  def _allocate(self, parts):
    def full(x, axis):
      shape = list(x.shape)
      shape[axis] = self.n
      return jax.ShapeDtypeStruct(tuple(shape), x.dtype)
    k, v, valid, prior = (full(x, a) for x, a in zip(parts, self._AXES, strict=True))
    sds = lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype)
    abstract = PrefixCaches(k=k, v=v, valid=valid, log_prior=prior,
                            shared_k=sds(self.shared[0]), shared_v=sds(self.shared[1]))
    own = lambda c: (c.k, c.v, c.valid, c.log_prior)
    # Without shardings the arrays stay uncommitted, like any jnp result, so a jitted step that
    # also takes uncommitted state compiles once.
    self.shardings = None if self.out_shardings is None else self.out_shardings(abstract)
    targets = None if self.shardings is None else own(self.shardings)
    self.buffers = jax.jit(lambda: tuple(jnp.zeros(x.shape, x.dtype) for x in own(abstract)),
                           out_shardings=targets)()

    def write(buffers, parts, rows):
      # A scatter along the example axis of the donated buffers, in place. A padded chunk's
      # repeated rows write the same values twice.
      def put(buf, part, axis):
        index = (slice(None),) * axis + (rows,)
        return buf.at[index].set(part.astype(buf.dtype), mode='promise_in_bounds')
      return tuple(put(b, p, a) for b, p, a in zip(buffers, parts, self._AXES, strict=True))

    self._write = jax.jit(write, donate_argnums=(0,), out_shardings=targets)

  def write(self, rows: np.ndarray, parts):
    """Writes a chunk's ``parts`` (one row per entry of ``rows``) to examples ``rows``."""
    if self.buffers is None:
      self._allocate(parts)
    self.buffers = self._write(self.buffers, parts, jnp.asarray(rows, jnp.int32))

  def result(self) -> PrefixCaches:
    k, v, valid, prior = self.buffers
    if self.shardings is None:
      return PrefixCaches(k=k, v=v, valid=valid, log_prior=prior, shared_k=self.shared[0],
                          shared_v=self.shared[1])
    put = lambda x, s: None if x is None else jax.device_put(x, s)
    return PrefixCaches(k=k, v=v, valid=valid, log_prior=prior,
                        shared_k=put(self.shared[0], self.shardings.shared_k),
                        shared_v=put(self.shared[1], self.shardings.shared_v))


def answer_log_probs(model: Llama, params, cache: KVCache | PrefixCache,
                     label_embeddings: jax.Array, tail_ids: jax.Array, answer_ids: jax.Array,
                     answer_bias: jax.Array, full_vocab: bool) -> jax.Array:
  """log P(yes), log P(no) [batch, 2] after [label slot(s), tail] on top of ``cache``.

  ``label_embeddings`` is [K, hidden] (one label for the batch) or [batch, K, hidden].
  ``answer_bias`` (a scalar, or one per example) is added to the yes-logit. With
  ``full_vocab`` the answer distribution is the softmax over the whole vocabulary (as in the
  paper); otherwise over the two answers only.
  """
  batch = cache.valid.shape[0]
  if label_embeddings.ndim == 2:
    label_embeddings = jnp.broadcast_to(label_embeddings, (batch, *label_embeddings.shape))
  tail = jnp.take(params['embed'], tail_ids, axis=0).astype(label_embeddings.dtype)
  tail = jnp.broadcast_to(tail, (batch, *tail.shape))
  x = jnp.concatenate([label_embeddings, tail], axis=1)
  hidden, _ = model.apply({'params': params}, embeddings=x, cache=cache, return_hidden=True)
  last = hidden[:, -1]
  bias = jnp.stack([answer_bias, jnp.zeros_like(answer_bias)], axis=-1)
  if full_vocab:
    logits = model.apply({'params': params}, last, method=Llama.logits)
    logits = logits.at[:, answer_ids[0]].add(answer_bias)
    return jnp.take(jax.nn.log_softmax(logits, axis=-1), answer_ids, axis=1)
  logits = model.apply({'params': params}, last, answer_ids, method=Llama.logits) + bias
  return jax.nn.log_softmax(logits, axis=-1)


def label_prefix_log_priors(model: Llama, params, cache: KVCache | PrefixCache,
                            label_ids: jax.Array) -> jax.Array:
  """log q [batch, T, V]: the model's next-token distribution after each of the discrete label
  tokens ``label_ids`` [T], placed in the slot on top of ``cache``.

  Row ``k`` is the naturalness prior of label position ``k + 1``: what the model itself would
  write next, given the label so far.
  """
  batch = cache.valid.shape[0]
  x = jnp.take(params['embed'], label_ids, axis=0).astype(model.dtype)
  x = jnp.broadcast_to(x, (batch, *x.shape))
  hidden, _ = model.apply({'params': params}, embeddings=x, cache=cache, return_hidden=True)
  logits = model.apply({'params': params}, hidden, method=Llama.logits)
  return jax.nn.log_softmax(logits, axis=-1)
