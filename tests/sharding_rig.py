"""A tiny labeling problem for the sharded-step tests.

Imported both by pytest (one CPU device) and by ``sharded_step_check.py``, which runs in child
processes with simulated devices: the device count must be fixed before JAX starts, which the
pytest process has long done. Both sides build the same problem from fixed seeds, so the child's
sharded run and the parent's single-device reference see identical inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from tokenspace_jax.classifier import prefix, prompts
from tokenspace_jax.classifier.objective import LossWeights, Objective
from tokenspace_jax.engine import descent
from tokenspace_jax.models import Llama, LlamaConfig
from tokenspace_jax.models.loading.param_mapping import abstract_params
from tokenspace_jax.parallel import shard_layout

# Every axis the model mesh axis splits (vocab 96, heads 4, kv heads 2, MLP 64) is even.
TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False)
YES, NO = 3, 4
N_EXAMPLES, N_TRAIN, BATCH, STEPS = 40, 32, 16, 3
B1, LR = 0.9, 0.05
SCALE = 8


def tiny_model():
  """The model and its weights, drawn with numpy from the parameter shapes: ``model.init`` would
  compile every initializer (seconds of CPU in each of the test's processes)."""
  model = Llama(TINY)
  rng = np.random.default_rng(0)
  # Matrices 8x larger than the 0.02 init, so the label visibly changes the answer; norm scales
  # stay 1. (Scaling the stacked norm scales too makes logits so large that float32 gradients
  # depend on the batch shape at 1e-4, as XLA picks other dot kernels for other batch sizes:
  # that would swamp the tolerance.)
  draw = lambda path, x: (np.ones(x.shape, np.float32) if path[-1] == 'scale' else
                          rng.normal(0, 0.02 * SCALE, x.shape).astype(np.float32))
  flat = flatten_dict(abstract_params(model))
  return model, unflatten_dict({k: jnp.asarray(draw(k, v)) for k, v in sorted(flat.items())})


def objective_and_optimizer(model):
  """SGD with momentum: its label is linear in the gradients, so float32 reduction order moves it
  by ~1e-8. Adam divides by |g| elementwise: after a few steps a 1e-7 relative difference in a
  near-cancelling coordinate can move that coordinate by 1e-3, whatever the sharding."""
  objective = Objective(model, LossWeights(1.0, 0.1, 0, 0.05), full_vocab_answer=True)
  return objective, optax.sgd(LR, momentum=B1)


def initial_state(optimizer):
  rng = np.random.default_rng(3)
  label = {'logits': jnp.asarray(rng.normal(size=(1, TINY.vocab_size)), jnp.float32),
           'answer_bias': jnp.asarray(0.2, jnp.float32)}
  return descent.init_state(label, optimizer)


_BASE = {}
N_TEXTS = 10  # examples 4t..4t+3 ask about one text: they share its tokens as a context


def _base_problem():
  """Each example's prompt tokens (its text's, then its own) and the targets, in example
  order, drawn once per process."""
  if not _BASE:
    rng = np.random.default_rng(0)
    texts = [list(rng.integers(5, TINY.vocab_size, rng.integers(4, 8))) for _ in range(N_TEXTS)]
    _BASE['tokens'] = [texts[i * N_TEXTS // N_EXAMPLES]
                       + list(rng.integers(5, TINY.vocab_size, rng.integers(1, 4)))
                       for i in range(N_EXAMPLES)]
    _BASE['targets'] = rng.permutation(np.arange(N_EXAMPLES) % 2).astype(np.float32)
  return _BASE['tokens'], _BASE['targets']


def host_problem(model, params, data_shards: int):
  """(DescentData of numpy arrays with a local-slot schedule, its layout), for ``data_shards``.

  The examples of one text share a context within each data shard (``prompts.split_contexts``),
  so a shard's step reads its block of contexts by the global context index (``PrefixCaches``).
  """
  tokens, targets = _base_problem()
  layout = shard_layout.layout_examples(targets, np.arange(N_EXAMPLES) < N_TRAIN, data_shards)
  contexts, context_of, own = prompts.split_contexts(
      [[int(t) for t in tokens[i]] for i in layout.order],
      [i * N_TEXTS // N_EXAMPLES for i in layout.order], data_shards)
  ids, mask = prompts.left_padded(own, 0, prompts.OWN_PAD_AFTER_CONTEXT)
  context_ids, context_mask = prompts.left_padded(contexts, 0, 8)
  caches = jax.tree.map(np.asarray, prefix.prefix_caches(
      model, params, np.zeros(0, np.int32), ids, mask, chunk=8,
      contexts=(context_ids, context_mask, context_of), blocks=data_shards))
  train = ~layout.padding & (layout.order < N_TRAIN)
  schedule = shard_layout.shard_schedule(layout, targets, STEPS, BATCH, 0.5, seed=0)
  allowed = np.ones(TINY.vocab_size, bool)
  allowed[:5] = False
  data = descent.DescentData(
      params=jax.tree.map(np.asarray, params), caches=caches,
      targets=layout.arrange(targets), schedule=schedule,
      tail_ids=np.asarray([7, 8, 9], np.int32), answer_ids=np.asarray([YES, NO], np.int32),
      allowed=allowed, mean_log_prior=caches.log_prior[train].mean(0))
  return data, layout


HP = {'lr': np.asarray([LR], np.float32), 'w_label': np.asarray([1.0], np.float32),
      'w_entropy': np.asarray([0.1], np.float32), 'w_kl': np.asarray([0.05], np.float32)}


def as_rows(data: descent.DescentData) -> descent.DescentData:
  """``data`` for the engine's step over label rows, with one row."""
  return data.replace(schedule=data.schedule[None], mean_log_prior=data.mean_log_prior[None])


def rows_state(optimizer):
  """``initial_state`` as the engine's rows step holds it: one row, its optimizer chained with
  the row's learning-rate scale."""
  label = initial_state(optimizer)['label']
  state = descent.init_state(label, optax.chain(optimizer, optax.scale(1.0)))
  return jax.tree.map(lambda x: x[None], state)


def run_steps(step, state, data, rows: bool = False) -> dict:
  """Losses, the first step's gradient (from the first momentum), the final label.

  ``rows``: ``step`` is the engine's rows step ``(state, data, hp, active)`` over one row.
  """
  terms = ('loss', 'answer_ce', 'batch_accuracy', 'kl', 'entropy')
  out = {k: [] for k in terms}
  hp = jax.tree.map(jnp.asarray, HP)
  active = jnp.ones(1, bool)
  one = (lambda x: x[0]) if rows else (lambda x: x)
  for t in range(STEPS):
    state, metrics = step(state, data, hp, active) if rows else step(state, data)
    m = jax.tree.map(one, jax.device_get(metrics))
    assert bool(m['ok'])
    for k in terms:
      out[k].append(float(m[k]))
    if t == 0:  # the first momentum trace is the gradient (Adam's first moment, scaled)
      first = state['opt_state'][0][0] if rows else state['opt_state'][0]
      g = jax.tree.map(one, jax.device_get(first.mu if hasattr(first, 'mu') else first.trace))
      scale = 1 - B1 if hasattr(first, 'mu') else 1.0
      out['grad_logits'] = g['logits'] / scale
      out['grad_bias'] = g['answer_bias'] / scale
  label = jax.tree.map(one, jax.device_get(state['label']))
  out.update(logits=label['logits'], answer_bias=label['answer_bias'],
             compilations=step._cache_size())
  return {k: np.asarray(v) for k, v in out.items()}


def reference(data_shards: int, step=None) -> dict:
  """``descent.make_step`` on one device, over the global slots of the sharded schedule.

  Pass the ``step`` of an earlier call to reuse its compilation (every layout has one shape).
  """
  model, params = tiny_model()
  objective, optimizer = objective_and_optimizer(model)
  data, layout = host_problem(model, params, data_shards)
  data = data.replace(schedule=shard_layout.to_global(data.schedule, layout))
  data = jax.tree.map(jnp.asarray, data)
  step = step or descent.make_step(objective, optimizer)
  return run_steps(step, initial_state(optimizer), data)
