"""Discrete steps beside the relaxation: a search during descent, and the final choice.

The relaxed label ``p @ E`` can settle on a mixture, or on a token the classifier likes less
than one the descent never reached. Two discrete complements, in the way GCG and AutoPrompt
search token space:

* **search** (``search.every`` steps): at each row's current top token ``a``, the gradient of
  the answer loss with respect to the slot's embedding ranks every token ``i`` by the linearised
  change ``(E_i - E_a) . g``; the ``search.candidates`` best are scored exactly on the step's
  training batch (one batched forward, the discrete loss: answer cross-entropy plus
  ``w_kl * -log q_i``), and when one beats ``a`` its logit is swapped with ``a``'s (as are its
  Adam moments), so the relaxation continues from the better token with the same confidence.
* **final choice** (``choice.top_k``): after descent the top tokens of ``p`` (and any
  ``choice.candidates``) are scored one at a time in the slot on training examples, and the best
  by training AUROC is the label. The held-out split never chooses.

The search works on single-token labels (``label.num_tokens=1``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.classifier import prefix
from tokenspace_jax.classifier.objective import Objective
from tokenspace_jax.engine.rows import ROW_AXES

_NEVER = -1e30


def make_search(objective: Objective, every: int, candidates: int, slot_offsets: np.ndarray):
  """``search(rows, data, hp, active, t) -> rows``: a search of every active row before step
  ``t`` when ``t`` is a positive multiple of ``every``; otherwise ``rows`` unchanged.

  ``slot_offsets`` [batch] turns the schedule's local slots into global ones (0 on one device).
  """
  model = objective.model
  offsets = jnp.asarray(slot_offsets, jnp.int32)

  def row(state, data, hp):
    label = state['label']
    log_p = objective.log_p(label, data.allowed)[0]
    a = jnp.argmax(log_p)
    t = jnp.minimum(state['step'], data.schedule.shape[0] - 1)
    idx = data.schedule[t] + offsets
    targets = jnp.take(data.targets, idx)
    embed = data.params['embed']
    bias = data.caches.answer_bias(
        label['answer_bias'] if objective.learn_answer_bias else jnp.zeros(()), idx)
    cache = data.caches.take(idx)

    def ce(e):  # e [batch, 1, hidden]: one slot embedding per example
      lp = prefix.answer_log_probs(model, data.params, cache, e.astype(model.dtype),
                                   data.tail_ids, data.answer_ids, bias,
                                   objective.full_vocab_answer)
      return -(targets * lp[:, 0] + (1 - targets) * lp[:, 1])

    batch = idx.shape[0]
    here = jnp.broadcast_to(embed[a].astype(jnp.float32), (batch, 1, embed.shape[1]))
    g = jax.grad(lambda e: ce(e).mean())(here).sum(axis=(0, 1))  # [hidden]
    rank = jnp.where(data.allowed, -(embed.astype(jnp.float32) @ g), _NEVER)
    rank = rank.at[a].set(_NEVER)
    _, cand = jax.lax.top_k(rank, candidates)
    ids = jnp.concatenate([a[None], cand])  # [C], the current token first
    c = ids.shape[0]
    flat = data.caches.take(jnp.tile(idx, c))
    emb = jnp.repeat(embed[ids][:, None], batch, axis=0)  # [C * batch, 1, hidden]
    lp = prefix.answer_log_probs(model, data.params, flat, emb.astype(model.dtype),
                                 data.tail_ids, data.answer_ids,
                                 jnp.tile(jnp.broadcast_to(bias, (batch,)), c),
                                 objective.full_vocab_answer)
    tiled = jnp.tile(targets, c)
    losses = -(tiled * lp[:, 0] + (1 - tiled) * lp[:, 1]).reshape(c, batch).mean(axis=1)
    losses = hp['w_label'] * losses - hp['w_kl'] * data.mean_log_prior[ids]
    best = jnp.argmin(losses)
    b = ids[best]
    better = losses[best] < losses[0] - 1e-6

    def swap(x):
      if x.shape != label['logits'].shape:
        return x
      xa, xb = x[:, a], x[:, b]
      return x.at[:, a].set(xb).at[:, b].set(xa)

    swapped = {'label': {**label, 'logits': swap(label['logits'])},
               'opt_state': jax.tree.map(swap, state['opt_state']), 'step': state['step']}
    return jax.tree.map(lambda n, o: jnp.where(better, n, o), swapped, state)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def run(rows, data, hp, active):
    new = jax.vmap(row, in_axes=(0, ROW_AXES, 0))(rows, data, hp)
    keep = lambda n, o: jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)
    return jax.tree.map(keep, new, rows)

  def search(rows, data, hp, active, t: int):
    if every <= 0 or t == 0 or t % every:
      return rows
    return run(rows, data, hp, active)

  return search
