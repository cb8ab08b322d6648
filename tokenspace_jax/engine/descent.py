"""The descent step: loss, gradient and Optax update of the label, in one jitted function.

Everything the step reads that does not change (weights, prefix caches, targets, the batch
schedule) travels in ``DescentData``, passed as an argument rather than closed over, so large
arrays never become compile-time constants. The batch of step ``t`` is row ``t`` of a schedule
computed up front: the step reads it on device, and a resumed run sees the same batches.

A step whose loss or update is not finite leaves the state unchanged and reports ``ok=False``,
so the caller still holds the last good label (the state buffers are donated).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from tokenspace_jax.classifier.objective import Objective
from tokenspace_jax.classifier.prefix import PrefixCaches


class DescentData(flax.struct.PyTreeNode):
  params: dict
  caches: PrefixCaches
  targets: jax.Array  # [examples] float32 in {0, 1}
  schedule: jax.Array  # [steps, batch] int32 example indices
  tail_ids: jax.Array  # [T] int32
  answer_ids: jax.Array  # [2] int32: yes, no
  allowed: jax.Array  # [V] bool
  mean_log_prior: jax.Array  # [V] mean over training examples of log q


def make_optimizer(cfg) -> optax.GradientTransformation:
  """``config.optim``: adam or adamw, optional warm-up/cosine schedule and gradient clipping."""
  lr = cfg.lr
  if cfg.get('schedule', 'constant') == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.get('warmup_steps', 0) or 1,
                                            cfg.decay_steps, cfg.lr * cfg.get('final_lr', 0.1))
  if cfg.name == 'adam':
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  elif cfg.name == 'adamw':
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  else:
    raise ValueError(f'optim.name={cfg.name!r} is not one of adam, adamw.')
  if cfg.get('clip_norm'):
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt


def init_state(label: dict, optimizer: optax.GradientTransformation) -> dict:
  return {'label': label, 'opt_state': optimizer.init(label), 'step': jnp.zeros((), jnp.int32)}


def make_step(objective: Objective, optimizer: optax.GradientTransformation, top_k: int = 5,
              candidates: int = 0):
  """``step(state, data) -> (state, metrics)``, jitted with the state donated.

  With ``candidates`` > 0 the metrics say whether the step left the final choice's candidate
  set alone (``settled``): the ``candidates`` most probable tokens of every label position,
  compared before and after the update as sets. The choice scores each candidate exactly,
  whatever its probability, so once that set stops changing, more steps only matter if they
  would bring a new token into it.
  """

  def step(state, data: DescentData):
    t = state['step']
    idx = data.schedule[jnp.minimum(t, data.schedule.shape[0] - 1)]
    targets = jnp.take(data.targets, idx)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (_, metrics), grads = grad_fn(state['label'], data.params, data.caches, idx, targets,
                                  data.tail_ids, data.answer_ids, data.allowed,
                                  data.mean_log_prior, t)
    if not objective.learn_answer_bias:
      grads['answer_bias'] = jnp.zeros_like(grads['answer_bias'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['label'])
    label = optax.apply_updates(state['label'], updates)
    ok = jnp.isfinite(metrics['loss']) & jnp.all(jnp.isfinite(label['logits']))
    new = {'label': label, 'opt_state': opt_state, 'step': t + 1}
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    log_p = objective.log_p(label, data.allowed)  # [K, V]
    p = jnp.exp(log_p)
    top_p, top_ids = jax.lax.top_k(p[0], top_k)
    out = {**metrics, 'ok': ok, 'top_ids': top_ids, 'top_p': top_p,
           'label_ids': jnp.argmax(p, axis=-1), 'label_p': jnp.max(p, axis=-1),
           'answer_bias': label['answer_bias']}
    if candidates:
      before = objective.log_p(state['label'], data.allowed)
      out['settled'] = ok & _same_candidates(before, log_p, candidates)
    return new, out

  return jax.jit(step, donate_argnums=(0,))


def _same_candidates(before: jax.Array, after: jax.Array, k: int) -> jax.Array:
  """Whether labels of log-probabilities ``before`` and ``after`` [K, V] give the final choice the
  same candidates: the same set of ``k`` most probable tokens at every position and, for a label
  of several tokens (whose candidates vary one position around the others' most probable
  tokens), the same argmax."""
  top = lambda log_p: (jnp.sort(jax.lax.top_k(log_p, k)[1], axis=-1),
                       jnp.argmax(log_p, axis=-1))
  (set_a, arg_a), (set_b, arg_b) = top(before), top(after)
  same = jnp.all(set_a == set_b)
  return same & jnp.all(arg_a == arg_b) if arg_a.shape[0] > 1 else same
