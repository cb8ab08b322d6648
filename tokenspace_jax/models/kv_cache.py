"""The key/value cache: a fixed-capacity buffer, so that appending never changes a shape.

Sequences are left-padded: every example's prefix ends at the same slot, so a new block of tokens
is written at one shared offset ``end`` for the whole batch, and the per-example validity mask
keeps padding slots out of attention. Fixed shapes mean one compilation for every decoding step.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tokenspace_jax.models.config import LlamaConfig


class KVCache(flax.struct.PyTreeNode):
  k: jax.Array  # [layers, batch, capacity, kv_heads, head_dim], RoPE already applied
  v: jax.Array  # [layers, batch, capacity, kv_heads, head_dim]
  valid: jax.Array  # [batch, capacity] bool: slot holds a real (non-padding) token
  end: jax.Array  # [] int32: first slot not yet written

  @classmethod
  def empty(cls, config: LlamaConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_layers, batch, capacity, config.num_kv_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               valid=jnp.zeros((batch, capacity), bool), end=jnp.zeros((), jnp.int32))

  @property
  def lengths(self) -> jax.Array:
    """Number of real tokens per example; the next token's RoPE position."""
    return self.valid.sum(axis=1, dtype=jnp.int32)

  def append(self, k: jax.Array, v: jax.Array, mask: jax.Array) -> KVCache:
    """Writes a block of T tokens (k, v: [layers, batch, T, ...], mask: [batch, T]) at ``end``."""
    zero = jnp.zeros((), jnp.int32)
    at = (zero, zero, self.end, zero, zero)
    return KVCache(
        k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
        v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at),
        valid=jax.lax.dynamic_update_slice(self.valid, mask, (zero, self.end)),
        end=self.end + mask.shape[1])


class PrefixCache(flax.struct.PyTreeNode):
  """Read-only keys/values of many prompts, attended by a batch that names its prompts by row.

  Token-space descent attends a different batch of cached prompt prefixes every step. Gathering
  them into a ``KVCache`` would copy batch x prefix x layers of keys and values per step (and the
  gradient would keep a second copy for the backward pass); instead each layer reads its own rows
  in place, inside the layer scan. The tokens every prompt starts with (instructions, few-shot
  examples) are stored once and attended by the whole batch as one matrix, so per step only the
  examples' own tokens are gathered.

  Between the two there may be a *context* block: tokens that several prompts, but not all,
  share (the text that several examples ask about, one word each), stored once per context.

  Prompts differ in length, so own tokens and contexts are both *packed*: their tokens lie end
  to end on one token axis, and a batch row reads the W consecutive tokens that end with its
  prompt's (or context's) last one. The slots before its first token hold the tokens of the one
  before it and are masked, as left padding would be; no padding is stored.

  A new block attends [shared | context | own | itself]; nothing is written, so the model returns
  no cache. The one exception is a cache without own tokens (``k`` None, see ``shared_only`` and
  ``with_context``): the block run on it comes back as the cache's own part (``append``). That is
  how the prefix pass computes every prompt's keys and values against the parts before them,
  held once, rather than copied into each prompt's cache.
  """

  shared_k: jax.Array | None  # [layers, S, kv_heads, head_dim]: the tokens all prompts share
  shared_v: jax.Array | None
  # [layers, T, kv_heads, head_dim]: the prompts' own tokens, packed; None in a cache of shared
  # tokens only, with ``valid`` and ``starts`` None too.
  k: jax.Array | None
  v: jax.Array | None
  valid: jax.Array | None  # [batch, W] bool: the own slots of each batch row that hold real tokens
  starts: jax.Array | None  # [batch] int32: where each batch row's W own slots begin in ``k``
  # [layers, T, kv_heads, head_dim]: the packed tokens of the contexts, tokens shared by some
  # prompts; None where the prompts have no context block.
  context_k: jax.Array | None = None
  context_v: jax.Array | None = None
  context_valid: jax.Array | None = None  # [batch, C] bool: each batch row's real context slots
  # [batch] int32: where each batch row's C context slots begin on the packed token axis
  context_starts: jax.Array | None = None

  @classmethod
  def shared_only(cls, shared_k: jax.Array | None, shared_v: jax.Array | None) -> PrefixCache:
    """The tokens every prompt shares, ready to have each prompt's own tokens run on top."""
    return cls(shared_k=shared_k, shared_v=shared_v, k=None, v=None, valid=None, starts=None)

  @classmethod
  def with_context(cls, shared_k, shared_v, context_k, context_v, context_valid,
                   context_starts) -> PrefixCache:
    """Shared tokens and a context per batch row, ready to have each prompt's own tokens run on
    top (``context_valid`` [batch, C] and ``context_starts`` [batch] are already the batch
    rows')."""
    return cls.shared_only(shared_k, shared_v).replace(
        context_k=context_k, context_v=context_v, context_valid=context_valid,
        context_starts=context_starts)

  @property
  def appends(self) -> bool:
    """Whether a block run on this cache comes back as the cache's own part (see ``append``)."""
    return self.k is None

  @property
  def shared_length(self) -> int:
    return 0 if self.shared_k is None else self.shared_k.shape[1]

  @property
  def lengths(self) -> jax.Array:
    """Number of real tokens per batch row ([] with neither own nor context tokens); the next
    RoPE position."""
    n = jnp.asarray(self.shared_length, jnp.int32)
    for valid in (self.context_valid, self.valid):
      if valid is not None:
        n = n + valid.sum(axis=1, dtype=jnp.int32)
    return n

  def append(self, k: jax.Array, v: jax.Array, mask: jax.Array) -> PrefixCache:
    """This cache with the block (k, v: [layers, batch, T, ...]) as its own tokens (packed at
    a stride of T: row i's slots are tokens iT ... iT + T - 1)."""
    if not self.appends:
      raise ValueError('Only a cache without own tokens takes a block as its own part.')
    b, t = mask.shape
    pack = lambda x: x.reshape(x.shape[0], b * t, *x.shape[3:])
    return self.replace(k=pack(k), v=pack(v), valid=mask,
                        starts=jnp.arange(b, dtype=jnp.int32) * t)

  def own_layer(self, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [batch, W, kv_heads, head_dim] of the batch's own tokens in ``layer``."""
    return _packed_runs(self.k, self.v, layer, self.starts, self.valid.shape[1])

  def context_layer(self, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [batch, C, kv_heads, head_dim] of the batch's contexts in ``layer``."""
    return _packed_runs(self.context_k, self.context_v, layer, self.context_starts,
                        self.context_valid.shape[1])


def _packed_runs(k, v, layer, starts, width):
  """Runs of ``width`` consecutive packed tokens from ``starts`` [batch] in ``layer`` of k, v
  [layers, T, ...]: read in place, a gather about as fast as one of whole rows."""
  tokens = starts[:, None] + jnp.arange(width, dtype=starts.dtype)
  at = lambda x: x.at[layer, tokens].get(mode='clip')
  return at(k), at(v)
