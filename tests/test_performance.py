"""The descent step's performance contract, on a tiny model: no host<->device traffic inside the
loop, one compilation for every step, and prefix caches whose shared part is stored once and
which a batch reads in place.

A step that recompiles or copies its inputs to the device each time is still correct, so no other
test would notice; on a real model either costs more than the step itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.classifier import prefix
from tokenspace_jax.classifier.objective import LossWeights, Objective
from tokenspace_jax.engine import descent
from tokenspace_jax.models import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False)
SHARED = np.array([5, 6, 7, 8], np.int32)


def _problem(full_vocab: bool = True):
  model = Llama(TINY)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))['params']
  rng = np.random.default_rng(0)
  n, steps, batch = 12, 6, 4
  ids = rng.integers(5, TINY.vocab_size, (n, 8)).astype(np.int32)
  mask = np.ones(ids.shape, bool)
  mask[:, :2] = rng.random((n, 2)) < 0.5
  caches = prefix.prefix_caches(model, params, SHARED, ids, mask, chunk=4)
  data = descent.DescentData(
      params=params, caches=caches, targets=jnp.asarray(np.arange(n) % 2, jnp.float32),
      schedule=jnp.asarray(rng.integers(0, n, (steps, batch)), jnp.int32),
      tail_ids=jnp.asarray([7, 8, 9], jnp.int32), answer_ids=jnp.asarray([3, 4], jnp.int32),
      allowed=jnp.ones(TINY.vocab_size, bool).at[:3].set(False),
      mean_log_prior=caches.log_prior.mean(0))
  objective = Objective(model, LossWeights(1.0, 0.1, 2, 0.05), full_vocab_answer=full_vocab)
  optimizer = descent.make_optimizer(ConfigDict(dict(name='adam', lr=0.1, b1=0.9, b2=0.999)))
  label = label_lib.init_label(ConfigDict(dict(num_tokens=1, init='zeros', init_scale=1.0)),
                               TINY.vocab_size, jax.random.PRNGKey(0))
  return data, objective, optimizer, descent.init_state(label, optimizer)


def test_steady_state_steps_transfer_nothing_and_compile_once():
  for full_vocab in (True, False):
    data, objective, optimizer, state = _problem(full_vocab)
    step = descent.make_step(objective, optimizer)
    state, metrics = step(state, data)  # compiles; the inputs are already on the device
    jax.block_until_ready(metrics)
    with jax.transfer_guard('disallow'):
      for _ in range(4):
        state, metrics = step(state, data)
      jax.block_until_ready((state, metrics))
    assert step._cache_size() == 1
    assert int(state['step']) == 5 and bool(metrics['ok'])


def test_prefix_caches_store_the_shared_part_once():
  data, *_ = _problem()
  c = data.caches
  assert c.shared_k.shape == (TINY.num_layers, len(SHARED), TINY.num_kv_heads, TINY.head_dim)
  assert c.valid.shape == (12, 8)  # only each example's own tokens, packed:
  assert c.k.shape[:2] == (TINY.num_layers, 8 + int(np.asarray(c.valid).sum()))
  view = c.take(jnp.asarray([3, 1]))
  assert view.k is c.k  # read in place by row, not gathered into a copy
  np.testing.assert_array_equal(view.lengths, len(SHARED) + np.asarray(c.valid)[[3, 1]].sum(1))

