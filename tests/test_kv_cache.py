"""The KV cache, left padding and the other call forms must not change a single logit.

Token-space descent runs a fixed prompt prefix once into the cache and then only the short label
tail per step, batched over features with prompts of different lengths; any disagreement with a
plain full forward here would bias every label found.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.models import KVCache, greedy_generate


# Jitted, so that each shape compiles once; eager Flax re-traces the layer scan on every call.
@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens=None, **kw):
  return model.apply({'params': params}, tokens, **kw)


def _run(loaded, tokens, **kw):
  return _apply(loaded.model, loaded.params, jnp.asarray(tokens, jnp.int32), **kw)


REF_LEN = 24


def _reference(loaded, seq) -> np.ndarray:
  """Logits of one unpadded sequence by a plain full forward, at one shape for every length.

  Right padding cannot reach earlier positions through causal attention, so padding every
  sequence to REF_LEN and cutting the logits back gives the unpadded result with one compile.
  """
  padded = np.zeros((1, REF_LEN), np.int32)
  padded[0, :len(seq)] = seq
  return np.asarray(_run(loaded, padded)[0][0, :len(seq)])


def _tokens(vocab, shape, seed):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def test_prefix_then_tail_equals_full_forward(tiny_loaded):
  c = tiny_loaded.config
  tokens = _tokens(c.vocab_size, (2, 20), seed=0)
  full = np.stack([_reference(tiny_loaded, row) for row in tokens])
  cache = KVCache.empty(c, 2, 24)
  head, cache = _run(tiny_loaded, tokens[:, :12], cache=cache)
  assert int(cache.end) == 12 and cache.lengths.tolist() == [12, 12]
  tail, cache = _run(tiny_loaded, tokens[:, 12:], cache=cache)
  np.testing.assert_allclose(head, full[:, :12], atol=1e-5, rtol=0)
  np.testing.assert_allclose(tail, full[:, 12:], atol=1e-5, rtol=0)


def test_left_padded_prefixes(tiny_loaded):
  c = tiny_loaded.config
  lengths = [5, 9, 12]
  width, tail_len = max(lengths), 4
  rows = [_tokens(c.vocab_size, (n + tail_len,), seed=10 + n) for n in lengths]
  prefix = np.zeros((3, width), np.int32)
  mask = np.zeros((3, width), bool)
  for i, (n, row) in enumerate(zip(lengths, rows, strict=True)):
    # Pad with a real token id, not 0s: padding must be excluded by the mask, not by its value.
    prefix[i, :width - n] = 7
    prefix[i, width - n:] = row[:n]
    mask[i, width - n:] = True
  cache = KVCache.empty(c, 3, width + tail_len)
  head, cache = _run(tiny_loaded, prefix, input_mask=jnp.asarray(mask), cache=cache)
  assert cache.lengths.tolist() == lengths
  tail, _ = _run(tiny_loaded, np.stack([r[n:] for n, r in zip(lengths, rows, strict=True)]),
                 cache=cache)
  for i, (n, row) in enumerate(zip(lengths, rows, strict=True)):
    alone = _reference(tiny_loaded, row)
    np.testing.assert_allclose(tail[i], alone[n:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(head[i, width - n:], alone[:n], atol=1e-5, rtol=0)


def test_embeddings_input_equals_tokens(tiny_loaded):
  tokens = _tokens(tiny_loaded.config.vocab_size, (2, 10), seed=1)
  by_id, _ = _run(tiny_loaded, tokens)
  embeddings = jnp.take(tiny_loaded.params['embed'], jnp.asarray(tokens), axis=0)
  by_vec, _ = _apply(tiny_loaded.model, tiny_loaded.params, embeddings=embeddings)
  np.testing.assert_allclose(by_vec, by_id, atol=1e-6, rtol=0)


def test_readout_ids_select_logit_columns(tiny_loaded):
  tokens = _tokens(tiny_loaded.config.vocab_size, (2, 10), seed=2)
  ids = jnp.asarray([3, 200, 17, 3])
  full, _ = _run(tiny_loaded, tokens)
  some, _ = _run(tiny_loaded, tokens, readout_ids=ids)
  np.testing.assert_allclose(some, full[..., np.asarray(ids)], atol=1e-6, rtol=0)


def _compiles(caplog, name: str) -> int:
  return sum(f'Compiling jit({name})' in r.getMessage() for r in caplog.records)


def test_generate_batched_and_compiled_once(tiny_loaded, caplog):
  m = tiny_loaded
  vocab = m.config.vocab_size
  prompts = [_tokens(vocab, (n,), seed=20 + n).tolist() for n in (3, 7, 5)]
  # A batch and length no other test uses, so the first call here compiles exactly once.
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    batched = greedy_generate(m.model, m.params, None, prompts, max_new_tokens=9)
    assert _compiles(caplog, '_prefill') == 1 and _compiles(caplog, '_decode_step') == 1
    caplog.clear()
    again = greedy_generate(m.model, m.params, None, [p[::-1] for p in prompts], 9)
    assert _compiles(caplog, '_prefill') == 0 and _compiles(caplog, '_decode_step') == 0
  assert [len(r) for r in batched + again] == [9] * 6
  for prompt, row in zip(prompts, batched, strict=True):
    # Greedy by hand: a full forward per token, no cache, no padding.
    seq = list(prompt)
    for _ in range(9):
      seq.append(int(np.argmax(_reference(m, seq)[-1])))
    assert row == seq[len(prompt):]


def test_generate_stops_at_eos(tiny_loaded):
  m = tiny_loaded
  prompts = [[5, 6, 7], [8, 9]]
  free = greedy_generate(m.model, m.params, None, prompts, max_new_tokens=6)
  eos = free[0][2]
  stopped = greedy_generate(m.model, m.params, None, prompts, max_new_tokens=6, eos_id=eos)
  assert stopped[0] == free[0][:3]
  cut = free[1].index(eos) + 1 if eos in free[1] else 6
  assert stopped[1] == free[1][:cut]
  # A flat prompt is a batch of one; numpy input is accepted as well as lists.
  one = greedy_generate(m.model, m.params, None, [[1, 2]], max_new_tokens=3)
  assert greedy_generate(m.model, m.params, None, [1, 2], max_new_tokens=3) == one
  assert greedy_generate(m.model, m.params, None, np.array([[1, 2]]), max_new_tokens=3) == one
