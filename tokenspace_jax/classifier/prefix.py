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

from tokenspace_jax.classifier.prompts import OWN_PAD_AFTER_CONTEXT
from tokenspace_jax.models.kv_cache import KVCache, PrefixCache
from tokenspace_jax.models.llama import Llama


class PrefixCaches(flax.struct.PyTreeNode):
  """Every example's prompt up to the slot, as keys/values; the shared part stored once.

  ``shared_k``/``shared_v`` (None when the prompts share no tokens) hold the tokens every prompt
  starts with; ``k``/``v`` each example's own tokens after them. Storing the shared part once,
  rather than in every example's cache, makes the caches several times smaller, and a step
  attends it as one matrix for the whole batch instead of gathering it per example.

  Own tokens (and contexts) are kept *packed* (``pack_left_padded``): end to end on one token
  axis, each example's W slots the W tokens that end with its last one. Prompts differ in
  length (a records window's words are 1 to 16 tokens after their text; a sentence 10 to 50),
  and kept left-padded to the longest they took two to four times the memory.
  """

  k: jax.Array  # [layers, T, kv_heads, head_dim]: own tokens, packed
  v: jax.Array
  valid: jax.Array  # [examples, W]: each example's real slots, left-padded
  start: jax.Array  # [examples] the packed token of each example's first slot
  # [examples, V]: log q, the model's next-token distribution at the slot. None once the pool has
  # averaged it per feature (``engine.pool``): a step reads only the mean, and on a 152k
  # vocabulary the per-example rows are a large share of the pool (docs/performance.md).
  log_prior: jax.Array | None
  shared_k: jax.Array | None = None  # [layers, S, kv_heads, head_dim]
  shared_v: jax.Array | None = None
  # [examples] the yes/no margin each example gets from labels that carry no information about
  # it (``engine.pool.contrast_baseline``); None: margins are used as the model gives them.
  baseline: jax.Array | None = None
  # Contexts: tokens between the shared part and the own ones that several examples share (the
  # text that several words are asked of), stored once each, packed as the own tokens are.
  # None: every example's tokens after the shared part are its own.
  context_k: jax.Array | None = None  # [layers, T_c, kv_heads, head_dim]: packed
  context_v: jax.Array | None = None
  context_valid: jax.Array | None = None  # [contexts, C]: each context's real slots, left-padded
  context_start: jax.Array | None = None  # [contexts] the packed token of each one's first slot
  # [examples] each example's context. On a mesh the contexts and all packed tokens are split
  # along ``data`` like the examples, each shard's examples reading only its own block of them;
  # the indices are global ones, and ``take`` reduces them modulo the contexts and tokens it sees
  # (all of them, or inside a ``shard_map`` its shard's block), which is the index into either.
  context_of: jax.Array | None = None

  @property
  def kv_bytes(self) -> int:
    """Bytes of the keys and values held: shared, context and own (what memory they take)."""
    parts = (self.k, self.v, self.shared_k, self.shared_v, self.context_k, self.context_v)
    return sum(int(x.size) * x.dtype.itemsize for x in parts if x is not None)

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
    context = {}
    if self.context_k is not None:
      rows = jnp.take(self.context_of, idx) % self.context_valid.shape[0]
      starts = jnp.take(self.context_start, rows) % self.context_k.shape[1]
      context = dict(context_k=self.context_k, context_v=self.context_v, context_starts=starts,
                     context_valid=jnp.take(self.context_valid, rows, axis=0))
    return PrefixCache(shared_k=self.shared_k, shared_v=self.shared_v, k=self.k, v=self.v,
                       valid=jnp.take(self.valid, idx, axis=0),
                       starts=jnp.take(self.start, idx) % self.k.shape[1], **context)


def pack_left_padded(mask: np.ndarray, blocks: int = 1) -> tuple[np.ndarray, int]:
  """Where each row's slots begin on a packed token axis ([rows] int32), and the axis's length,
  for left-padded rows ``mask`` [rows, W] in ``blocks`` equal runs (the data shards: examples
  as ``shard_layout`` lays them out, contexts as ``prompts.split_contexts`` does).

  Each run gets an equal share of the axis: W tokens that no row owns, then its rows' tokens
  end to end. Slot j of a row reads packed token start + j, so its W slots are the W tokens
  that end with its last one; those before its first token belong to the row before it (or to
  the W unowned ones) and are masked. Starts are global; a run's are less than its share's
  length past the share's beginning, so modulo that length they index a shard's block.
  """
  mask = np.asarray(mask, bool)
  n, width = mask.shape
  if n % blocks:
    raise ValueError(f'{n} rows do not split into {blocks} equal blocks.')
  per = n // blocks
  lengths = mask.sum(axis=1)
  share = width + max(int(lengths[b * per:(b + 1) * per].sum()) for b in range(blocks))
  starts = np.concatenate([b * share + np.cumsum(lengths[b * per:(b + 1) * per])
                           for b in range(blocks)]).astype(np.int32)
  return starts, share * blocks


def prefix_caches(model: Llama, params, shared_ids: np.ndarray, prefix_ids: np.ndarray,
                  prefix_mask: np.ndarray, chunk: int = 16, cache_dtype=None,
                  out_shardings=None, pad_to: int = 8,
                  contexts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                  blocks: int = 1) -> PrefixCaches:
  """Caches and priors for all examples, computed in jitted chunks of a fixed size.

  The part every prompt shares (``shared_ids``: instructions, few-shot examples) is run once,
  and each chunk's own tokens attend it as one matrix; only each example's own tokens are
  computed per example. The result keeps the shared part once (``shared_k``) and each
  example's own tokens (``k``), packed (``pack_left_padded``) in ``blocks`` equal runs of
  examples (and of contexts): the data shards, each of which holds its run.

  Chunks are made of examples of similar length (sorted by their number of own tokens), and each
  runs only as wide as its longest example, rounded up to ``pad_to`` so that a feature compiles
  a few widths, not one per length: one feature's prompts vary in length, and at the common width
  (the longest prompt's) much of each chunk would be padding (docs/results.md, "Time").
  RoPE positions count real tokens only, so a narrower chunk computes the same caches; each
  real token is written to its packed place.

  Each chunk is written into preallocated buffers as soon as it is computed, so the caches are
  held once, never as chunks plus their concatenation. ``out_shardings`` (a function from the
  result's ``jax.ShapeDtypeStruct``s to a matching tree of shardings) places those buffers on a
  device mesh, so no device ever holds more than its share of the caches (Llama-3-8B's caches
  of a few hundred examples exceed one accelerator's memory); by default they are on the
  default device. ``cache_dtype`` is what the kept keys and values are stored in (default: the
  activation dtype): they are computed in the activation dtype and cast once, so bfloat16
  caches under float32 activations take half the memory and each step reads them widened.

  ``contexts`` (ids [C, W_c], mask, and each example's context [N], as
  ``prompts.EncodedPrompts`` holds them) are run first, each once, on the shared part, and kept
  packed as the own tokens are; each example's own tokens then run on the shared part and its
  context (as stored, so in ``cache_dtype``). An empty context row (a block's padding, or an
  example's own empty context, see ``prompts.split_contexts``) is not run: nothing in it is
  attended.
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

  def run_block(params, cache, ids, mask):
    # The block attends the shared part as one matrix for the whole chunk (and each row its
    # context): copying them into every prompt's cache first cost a broadcast and a write of
    # them per chunk.
    hidden, own = model.apply({'params': params}, ids, input_mask=mask, cache=cache,
                              return_hidden=True)
    # The block's keys and values [layers, chunk, w, ...], in the dtype they are kept in.
    store = lambda x: x.reshape(x.shape[0], *ids.shape, *x.shape[2:]).astype(cache_dtype)
    return hidden, (store(own.k), store(own.v))

  @jax.jit
  def run_context(params, shared_k, shared_v, ids, mask):
    return run_block(params, PrefixCache.shared_only(shared_k, shared_v), ids, mask)[1]

  @jax.jit
  def run(params, shared_k, shared_v, context, context_rows, ids, mask):
    cache = PrefixCache.shared_only(shared_k, shared_v)
    if context is not None:  # each row reads its context in place, as a step does
      k, v, valid, start = context
      cache = PrefixCache.with_context(shared_k, shared_v, k, v,
                                       jnp.take(valid, context_rows, axis=0),
                                       jnp.take(start, context_rows))
    hidden, parts = run_block(params, cache, ids, mask)
    logits = model.apply({'params': params}, hidden[:, -1], method=Llama.logits)
    return (*parts, jax.nn.log_softmax(logits, axis=-1))

  # Computed in the activation dtype throughout; only what is kept is cast to ``cache_dtype``.
  shared_k = shared_v = None
  if n_shared:
    empty = KVCache.empty(model.config, 1, n_shared, model.dtype)
    shared_k, shared_v = run_shared(params, jnp.asarray(shared_ids), empty)
  shared = tuple(None if x is None else x.astype(cache_dtype) for x in (shared_k, shared_v))
  context_of = context = None
  if contexts is not None and not np.asarray(contexts[1]).any():
    contexts = None  # every context empty: each example's tokens are all its own
  if contexts is not None:
    context_ids, context_mask, context_of = contexts
    context_mask = np.asarray(context_mask, bool)
    starts, tokens = pack_left_padded(context_mask, blocks)
    writer = _ShardedWriter((tokens, tokens), (1, 1), lambda parts: PrefixCaches(
        k=None, v=None, valid=None, start=None, log_prior=None, context_k=parts[0],
        context_v=parts[1]), lambda c: (c.context_k, c.context_v), out_shardings)
    real = np.flatnonzero(context_mask.any(axis=1))
    for rows, ids, mask in _chunks(context_ids, context_mask, real, chunk, pad_to):
      where = _packed_places(starts, tokens, rows, mask, context_mask.shape[1])
      writer.write((where, where), run_context(params, shared_k, shared_v, ids, mask))
    context = (*writer.buffers, jnp.asarray(context_mask), jnp.asarray(starts))
  prefix_mask = np.asarray(prefix_mask, bool)
  starts, tokens = pack_left_padded(prefix_mask, blocks)
  writer = _ShardedWriter((tokens, tokens, n), (1, 1, 0), lambda parts: PrefixCaches(
      k=parts[0], v=parts[1], valid=None, start=None, log_prior=parts[2],
      shared_k=_abstract(shared[0]), shared_v=_abstract(shared[1])),
      lambda c: (c.k, c.v, c.log_prior), out_shardings)
  own_pad = pad_to if context is None else min(pad_to, OWN_PAD_AFTER_CONTEXT)
  for rows, ids, mask in _chunks(prefix_ids, prefix_mask, np.arange(n), chunk, own_pad):
    context_rows = None if context is None else jnp.asarray(np.asarray(context_of)[rows])
    where = _packed_places(starts, tokens, rows, mask, width)
    writer.write((where, where, rows),
                 run(params, shared_k, shared_v, context, context_rows, ids, mask))
  k, v, log_prior = writer.buffers
  result = PrefixCaches(k=k, v=v, valid=jnp.asarray(prefix_mask), start=jnp.asarray(starts),
                        log_prior=log_prior, shared_k=shared[0], shared_v=shared[1])
  if context is not None:
    result = result.replace(context_k=context[0], context_v=context[1],
                            context_valid=context[2], context_start=context[3],
                            context_of=jnp.asarray(context_of, jnp.int32))
  if out_shardings is None:
    return result
  # The shared part, the masks and the indices are small: placed once, as a whole.
  placed = out_shardings(jax.tree.map(_abstract, result))
  return result.replace(**{name: jax.device_put(getattr(result, name), getattr(placed, name))
                           for name in ('shared_k', 'shared_v', 'valid', 'start', 'context_valid',
                                        'context_start', 'context_of')
                           if getattr(result, name) is not None})


def _packed_places(starts: np.ndarray, tokens: int, rows: np.ndarray, mask: np.ndarray,
                   width: int) -> np.ndarray:
  """[chunk, w] the packed token of each column of a chunk ``w`` wide of left-padded ``rows``
  (``width`` wide when whole): column j is slot width - w + j. Padding goes past the end
  (``tokens``), where a write is dropped."""
  w = mask.shape[1]
  return np.where(mask, starts[rows, None] + (width - w) + np.arange(w), tokens)


def _abstract(x):
  return None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype)


def _chunks(ids: np.ndarray, mask: np.ndarray, rows: np.ndarray, chunk: int, pad_to: int):
  """(rows, ids, mask) of chunks of ``chunk`` of ``rows``, longest first, each cut to the width
  of its longest row rounded up to ``pad_to`` (see ``prefix_caches``)."""
  width = ids.shape[1]
  lengths = np.asarray(mask).sum(axis=1)
  order = np.asarray(rows)[np.argsort(-lengths[rows], kind='stable')]
  for start in range(0, len(order), chunk):
    part = order[start:start + chunk]
    if len(part) < chunk:  # pad the last chunk with a repeated row: one batch size for all
      part = np.concatenate([part, np.repeat(part[-1:], chunk - len(part))])
    w = min(width, max(pad_to, -(-int(lengths[part].max()) // pad_to) * pad_to))
    yield part, ids[part, width - w:], mask[part, width - w:]


class _ShardedWriter:
  """Chunks of a few arrays written into preallocated (sharded) buffers in place: each array
  along its axis in ``axes``, to the places a chunk names (an index array whose shape is that
  of the chunk's axes from there on), in a buffer of ``sizes`` places along it.

  ``abstract`` builds a ``PrefixCaches`` of ``jax.ShapeDtypeStruct``s from the buffers' shapes,
  for ``out_shardings`` to place; ``pick`` takes the buffers' fields back out of it.
  """

  def __init__(self, sizes: tuple[int, ...], axes: tuple[int, ...], abstract, pick,
               out_shardings):
    self.sizes, self.axes, self.abstract, self.pick = sizes, axes, abstract, pick
    self.out_shardings, self.buffers, self._write = out_shardings, None, None

  def _allocate(self, parts, places):
    def full(x, axis, size, index):
      shape = x.shape[:axis] + (size,) + x.shape[axis + np.ndim(index):]
      return jax.ShapeDtypeStruct(shape, x.dtype)
    full_parts = [full(x, a, n, i) for x, a, n, i in zip(parts, self.axes, self.sizes, places,
                                                          strict=True)]
    # Without shardings the arrays stay uncommitted, like any jnp result, so a jitted step that
    # also takes uncommitted state compiles once.
    targets = (None if self.out_shardings is None
               else tuple(self.pick(self.out_shardings(self.abstract(full_parts)))))
    self.buffers = jax.jit(lambda: tuple(jnp.zeros(x.shape, x.dtype) for x in full_parts),
                           out_shardings=targets)()

    def write(buffers, parts, places):
      # A scatter along each buffer's axis, in place (the buffers are donated). A padded
      # chunk's repeated rows write the same values twice; a place past the end is dropped.
      def put(buf, part, axis, where):
        index = (slice(None),) * axis + (where,)
        return buf.at[index].set(part.astype(buf.dtype), mode='drop')
      return tuple(put(b, p, a, w) for b, p, a, w in zip(buffers, parts, self.axes, places,
                                                          strict=True))

    self._write = jax.jit(write, donate_argnums=(0,), out_shardings=targets)

  def write(self, places: tuple[np.ndarray, ...], parts):
    """Writes a chunk's ``parts`` to ``places`` (one index array per part)."""
    if self.buffers is None:
      self._allocate(parts, places)
    self.buffers = self._write(self.buffers, parts,
                               tuple(jnp.asarray(p, jnp.int32) for p in places))


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
