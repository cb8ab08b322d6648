"""A pure-functional Llama decoder in Flax Linen.

Called as ``model.apply({'params': params}, ...)``. Token ids or input embeddings go in (the label
slot of token-space descent is a mixture of embeddings, not a token), an optional KV cache goes in
and comes out. Layers are stacked with ``nn.scan`` so compile time does not grow with depth and a
sharding rule for one layer covers all of them.

Numerics follow transformers' LlamaForCausalLM: RMSNorm and softmax in float32, RoPE in the
rotate-half layout with cos/sin cast to the activation dtype, the head in the activation dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.models.config import LlamaConfig, rope_inverse_frequencies
from tokenspace_jax.models.kv_cache import KVCache

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


class Attention(nn.Module):
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, input_mask, cached_kv, cache_valid):
    c = self.config
    b, t, _ = x.shape
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    q = dense(c.num_heads * c.head_dim, 'q')(x).reshape(b, t, c.num_heads, c.head_dim)
    k = dense(c.num_kv_heads * c.head_dim, 'k')(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = dense(c.num_kv_heads * c.head_dim, 'v')(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # Grouped-query attention without repeating K/V: queries are [b, t, kv_heads, group, d].
    acc = _accumulation_dtype(self.dtype)
    group = c.num_heads // c.num_kv_heads
    q = q.reshape(b, t, c.num_kv_heads, group, c.head_dim) * (c.head_dim ** -0.5)
    causal = jnp.tril(jnp.ones((t, t), bool))
    new_mask = causal[None, None, None] & input_mask[:, None, None, None, :]
    scores = [jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=acc)]
    masks = [new_mask]
    if cached_kv is not None:
      # Cached slots are all earlier than the new block; only padding is masked. The cache is
      # read in place (not concatenated), so a step that discards the new cache copies nothing.
      ck, cv = cached_kv
      scores.insert(0, jnp.einsum('btkgd,bskd->bkgts', q, ck.astype(q.dtype),
                                  preferred_element_type=acc))
      masks.insert(0, jnp.broadcast_to(cache_valid[:, None, None, None, :],
                                       (b, 1, 1, t, cache_valid.shape[1])))
    scores = jnp.concatenate(scores, axis=-1)
    mask = jnp.concatenate([jnp.broadcast_to(m, (b, 1, 1, t, m.shape[-1])) for m in masks], -1)
    probs = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1).astype(self.dtype)
    out = jnp.einsum('bkgts,bskd->btkgd', probs[..., -t:], v)
    if cached_kv is not None:
      out = out + jnp.einsum('bkgts,bskd->btkgd', probs[..., :-t], cv.astype(self.dtype))
    out = out.reshape(b, t, c.num_heads * c.head_dim)
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
  """One decoder layer; scanned over the layer axis, so it takes its cache slice as scan input."""

  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cached_kv, cos, sin, input_mask, cache_valid):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.config.rms_norm_eps
    h, new_kv = Attention(self.config, name='attn', **kw)(
        RMSNorm(eps, name='attn_norm', **kw)(x), cos, sin, input_mask, cached_kv, cache_valid)
    x = x + h
    x = x + MLP(self.config, name='mlp', **kw)(RMSNorm(eps, name='mlp_norm', **kw)(x))
    return x, new_kv


class Llama(nn.Module):
  """Llama decoder with embedding table ``embed`` [vocab, hidden] and optional ``lm_head``.

  Parameter tree: ``embed``, ``layers/{attn_norm,attn/{q,k,v,o},mlp_norm,mlp/{gate,up,down}}``
  (each leaf with a leading layer axis), ``final_norm/scale`` and, when the head is not tied,
  ``lm_head`` [hidden, vocab].
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
    self.layers = nn.scan(
        Block, variable_axes={'params': 0}, split_rngs={'params': True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=c.num_layers)(c, dtype=self.dtype, param_dtype=self.param_dtype)
    self.final_norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, tokens: jax.Array | None = None, *, embeddings: jax.Array | None = None,
               positions: jax.Array | None = None, input_mask: jax.Array | None = None,
               cache: KVCache | None = None, readout_ids: jax.Array | None = None,
               return_hidden: bool = False) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder over a block of tokens.

    Args:
      tokens: [batch, T] int ids; or
      embeddings: [batch, T, hidden] input embeddings (exactly one of the two).
      positions: [batch, T] RoPE positions; default: continue after the cache's real tokens,
        counting only unmasked inputs (so left padding gets positions 0.. for real tokens).
      input_mask: [batch, T] bool, False for padding; default all True.
      cache: the keys/values of earlier tokens; the block is appended at ``cache.end``.
      readout_ids: [R] vocabulary ids; logits only for these rows (e.g. the answer tokens).
      return_hidden: return the final-normed hidden states instead of logits.

    Returns:
      (logits [batch, T, vocab or R] in float32 (float64 for a float64 model), or hidden
      [batch, T, hidden]; the new cache, or None when no cache was given).
    """
    if (tokens is None) == (embeddings is None):
      raise ValueError('Pass exactly one of tokens and embeddings.')
    x = (jnp.take(self.embed, tokens, axis=0).astype(self.dtype) if embeddings is None
         else embeddings.astype(self.dtype))
    b, t = x.shape[:2]
    if input_mask is None:
      input_mask = jnp.ones((b, t), bool)
    if positions is None:
      start = cache.lengths[:, None] if cache is not None else 0
      positions = jnp.maximum(start + jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1, 0)
    cos, sin = rope_angles(self.config, positions, _accumulation_dtype(self.dtype))
    cached_kv = (cache.k, cache.v) if cache is not None else None
    cache_valid = cache.valid if cache is not None else None
    x, (k, v) = self.layers(x, cached_kv, cos, sin, input_mask, cache_valid)
    hidden = self.final_norm(x)
    new_cache = cache.append(k, v, input_mask) if cache is not None else None
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

  def embedding_table(self) -> jax.Array:
    return self.embed
