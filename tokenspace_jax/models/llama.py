"""A pure-functional Llama decoder in Flax Linen (and Qwen2, which is Llama with Q/K/V biases).

Called as ``model.apply({'params': params}, ...)``. Token ids or input embeddings go in (the label
slot of token-space descent is a mixture of embeddings, not a token), an optional KV cache goes in
and comes out. Layers are stacked with ``nn.scan`` so compile time does not grow with depth and a
sharding rule for one layer covers all of them.

Numerics follow transformers' LlamaForCausalLM: RMSNorm and softmax in float32, RoPE in the
rotate-half layout with cos/sin cast to the activation dtype, the head in the activation dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.models.config import LlamaConfig, rope_inverse_frequencies
from tokenspace_jax.models.kv_cache import KVCache, PrefixCache

Dtype = Any
_MASKED = float(np.finfo(np.float32).min)


def _accumulation_dtype(dtype) -> Dtype:
  """float32 for bfloat16/float32 activations; float64 stays float64 (gradient checks)."""
  return jnp.promote_types(dtype, jnp.float32)


class RMSNorm(nn.Module):
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(_accumulation_dtype(self.dtype))
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


def rope_angles(config: LlamaConfig, positions: jax.Array,
                dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """cos and sin, [batch, T, head_dim], for integer positions [batch, T]."""
  inv_freq = jnp.asarray(rope_inverse_frequencies(config), dtype)
  angles = positions.astype(dtype)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [batch, T, heads, head_dim]; HF's rotate-half convention."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def _attend_scores(q, keys, acc):
  """Scores [kv, b, t, group, s] of queries q [kv, b, t, group, d] against one block of keys:
  [b, s, kv, d] (each row its own) or [s, kv, d] (one block for the whole batch).

  A shared block is one [b·t·group, d] x [d, s] matmul per kv head: the layout XLA:CPU runs near
  its matmul rate, where an einsum that keeps the batch axes in place ran about twice as slow.
  """
  kv, b, t, g, d = q.shape
  if keys.ndim == 3:
    k_t = jnp.transpose(keys, (1, 2, 0)).astype(q.dtype)  # [kv, d, s]
    flat = jnp.matmul(q.reshape(kv, b * t * g, d), k_t, preferred_element_type=acc)
    return flat.reshape(kv, b, t, g, keys.shape[0])
  return jnp.einsum('kbtgd,bskd->kbtgs', q, keys.astype(q.dtype), preferred_element_type=acc)


def _attend_values(probs, values):
  """Outputs [kv, b, t, group, d] of probabilities [kv, b, t, group, s] over one block."""
  kv, b, t, g, s = probs.shape
  if values.ndim == 3:
    v_k = jnp.transpose(values, (1, 0, 2)).astype(probs.dtype)  # [kv, s, d]
    return jnp.matmul(probs.reshape(kv, b * t * g, s), v_k).reshape(kv, b, t, g, -1)
  return jnp.einsum('kbtgs,bskd->kbtgd', probs, values.astype(probs.dtype))


def _block_softmax(scores: list[jax.Array]) -> list[jax.Array]:
  """The softmax over the last axis of the blocks' scores joined, returned block by block.

  Equal to splitting ``softmax(concatenate(scores))``, without writing the concatenation.
  """
  top = functools.reduce(jnp.maximum, [s.max(axis=-1, keepdims=True) for s in scores])
  exps = [jnp.exp(s - top) for s in scores]
  inverse = 1 / sum(e.sum(axis=-1, keepdims=True) for e in exps)
  return [e * inverse for e in exps]


class Attention(nn.Module):
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, input_mask, layer, cache):
    c = self.config
    b, t, _ = x.shape
    dense = lambda n, name, bias=False: nn.Dense(n, use_bias=bias, dtype=self.dtype,
                                                 param_dtype=self.param_dtype, name=name)
    qkv = lambda heads, name: dense(heads * c.head_dim, name, c.qkv_bias)(x).reshape(
        b, t, heads, c.head_dim)
    # The Q/K/V biases (Qwen2) are added before RoPE, as in transformers: the cache holds rotated
    # keys that already include them.
    q, k, v = qkv(c.num_heads, 'q'), qkv(c.num_kv_heads, 'k'), qkv(c.num_kv_heads, 'v')
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # Grouped-query attention without repeating K/V: queries are [kv_heads, b, t, group, d].
    acc = _accumulation_dtype(self.dtype)
    group = c.num_heads // c.num_kv_heads
    q = q.reshape(b, t, c.num_kv_heads, group, c.head_dim) * (c.head_dim ** -0.5)
    q = jnp.transpose(q, (2, 0, 1, 3, 4))
    # Blocks of keys, values and their mask [b, t or 1, s] (None: all valid), all earlier than
    # the new tokens but the last. Each is read in place: nothing is concatenated.
    blocks = []
    if isinstance(cache, KVCache):
      blocks.append((cache.k[layer], cache.v[layer], cache.valid[:, None, :]))
    elif isinstance(cache, PrefixCache):
      if cache.shared_k is not None:  # one [S, kv, d] matrix for the whole batch
        blocks.append((cache.shared_k[layer], cache.shared_v[layer], None))
      if cache.context_k is not None:
        ctx_k, ctx_v = cache.context_layer(layer)
        blocks.append((ctx_k, ctx_v, cache.context_valid[:, None, :]))
      if cache.k is not None:
        own_k, own_v = cache.own_layer(layer)
        blocks.append((own_k, own_v, cache.valid[:, None, :]))
    causal = jnp.tril(jnp.ones((t, t), bool))
    blocks.append((k, v, causal[None] & input_mask[:, None, :]))
    scores = [_attend_scores(q, keys, acc) for keys, _, _ in blocks]
    scores = [s if m is None else jnp.where(m[None, :, :, None, :], s, _MASKED)
              for s, (_, _, m) in zip(scores, blocks, strict=True)]
    probs = [p.astype(self.dtype) for p in _block_softmax(scores)]
    out = sum(_attend_values(p, values) for p, (_, values, _) in zip(probs, blocks, strict=True))
    out = jnp.transpose(out, (1, 2, 0, 3, 4)).reshape(b, t, c.num_heads * c.head_dim)
    return dense(c.hidden_size, 'o')(out), (k, v)


class MLP(nn.Module):
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    f = self.config.intermediate_size
    return dense(self.config.hidden_size, 'down')(
        nn.silu(dense(f, 'gate')(x)) * dense(f, 'up')(x))


class Block(nn.Module):
  """One decoder layer; scanned over the layer axis with its index, which selects the layer's
  slice of the cache (read in place: a scanned cache input would be copied out per layer)."""

  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, layer, cos, sin, input_mask, cache):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.config.rms_norm_eps
    h, new_kv = Attention(self.config, name='attn', **kw)(
        RMSNorm(eps, name='attn_norm', **kw)(x), cos, sin, input_mask, layer, cache)
    x = x + h
    x = x + MLP(self.config, name='mlp', **kw)(RMSNorm(eps, name='mlp_norm', **kw)(x))
    # Only a cache that is appended to gets the new keys: stacking them otherwise would cost a
    # write per layer.
    return x, (new_kv if _appends(cache) else None)


def _appends(cache) -> bool:
  return isinstance(cache, KVCache) or (isinstance(cache, PrefixCache) and cache.appends)


class Llama(nn.Module):
  """Llama decoder with embedding table ``embed`` [vocab, hidden] and optional ``lm_head``.

  Parameter tree: ``embed``, ``layers/{attn_norm,attn/{q,k,v,o},mlp_norm,mlp/{gate,up,down}}``
  (each a ``kernel``, or a ``scale`` for the norms, with a leading layer axis), ``final_norm/scale``
  and, when the head is not tied, ``lm_head`` [hidden, vocab]. With ``config.qkv_bias`` (Qwen2),
  ``layers/attn/{q,k,v}/bias`` too.
  """

  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    init = nn.initializers.normal(0.02)
    self.embed = self.param('embed', init, (c.vocab_size, c.hidden_size), self.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = self.param('lm_head', init, (c.hidden_size, c.vocab_size), self.param_dtype)
    # Under differentiation a layer keeps only its matmul outputs for the backward pass and
    # recomputes the rest (norms, RoPE, attention over the cache): the recomputation is cheap,
    # whereas every saved [layers, ...] array is written, zero-filled and read back per step.
    block = nn.remat(Block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                     prevent_cse=False)
    self.layers = nn.scan(
        block, variable_axes={'params': 0}, split_rngs={'params': True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=c.num_layers)(c, dtype=self.dtype, param_dtype=self.param_dtype)
    self.final_norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, tokens: jax.Array | None = None, *, embeddings: jax.Array | None = None,
               positions: jax.Array | None = None, input_mask: jax.Array | None = None,
               cache: KVCache | PrefixCache | None = None,
               readout_ids: jax.Array | None = None,
               return_hidden: bool = False) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder over a block of tokens.

    Args:
      tokens: [batch, T] int ids; or
      embeddings: [batch, T, hidden] input embeddings (exactly one of the two).
      positions: [batch, T] RoPE positions; default: continue after the cache's real tokens,
        counting only unmasked inputs (so left padding gets positions 0.. for real tokens).
      input_mask: [batch, T] bool, False for padding; default all True.
      cache: the keys/values of earlier tokens: a KVCache (the block is appended at
        ``cache.end``) or a read-only PrefixCache (the block is attended, not stored; a
        shared-only PrefixCache comes back with the block as its own tokens).
      readout_ids: [R] vocabulary ids; logits only for these rows (e.g. the answer tokens).
      return_hidden: return the final-normed hidden states instead of logits.

    Returns:
      (logits [batch, T, vocab or R] in float32 (float64 for a float64 model), or hidden
      [batch, T, hidden]; the cache with the block appended, or None for a read-only one).
    """
    if (tokens is None) == (embeddings is None):
      raise ValueError('Pass exactly one of tokens and embeddings.')
    x = (jnp.take(self.embed, tokens, axis=0).astype(self.dtype) if embeddings is None
         else embeddings.astype(self.dtype))
    b, t = x.shape[:2]
    if input_mask is None:
      input_mask = jnp.ones((b, t), bool)
    if positions is None:
      start = jnp.reshape(cache.lengths, (-1, 1)) if cache is not None else 0
      positions = jnp.maximum(start + jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1, 0)
    cos, sin = rope_angles(self.config, positions, _accumulation_dtype(self.dtype))
    layer = jnp.arange(self.config.num_layers, dtype=jnp.int32)
    x, new_kv = self.layers(x, layer, cos, sin, input_mask, cache)
    hidden = self.final_norm(x)
    new_cache = cache.append(*new_kv, input_mask) if _appends(cache) else None
    if return_hidden:
      return hidden, new_cache
    return self.logits(hidden, readout_ids), new_cache

  def logits(self, hidden: jax.Array, readout_ids: jax.Array | None = None) -> jax.Array:
    """Output logits from final hidden states; only the rows ``readout_ids`` if given."""
    w = self.embed.T if self.config.tie_word_embeddings else self.lm_head
    if readout_ids is not None:
      w = jnp.take(w, readout_ids, axis=1)
    logits = jnp.einsum('...d,dv->...v', hidden, w.astype(self.dtype))
    return logits.astype(_accumulation_dtype(self.dtype))
