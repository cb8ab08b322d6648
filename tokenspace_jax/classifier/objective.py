"""The loss of token-space descent, term by term.

    L = w_label * CE(answer, target) + w_entropy(t) * H(p) + w_kl * KL(p || q)

``q`` is the frozen model's next-token distribution at the concept slot. The KL is averaged over
training examples; since KL(p||q_i) = -H(p) - p . log q_i, that average only needs the mean of
log q_i, computed once, so the term costs one dot product per step rather than one per example.

A label of K tokens has K distributions p_k, each with its own entropy and KL term (both
averaged over the positions). The prior of position k > 0 is the model's next-token
distribution after the label's current discrete prefix (the most probable token of each earlier
position), averaged over the batch: it changes as the label does, so it is computed every step,
by one extra forward pass of K - 1 tokens without gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tokenspace_jax.classifier import prefix
from tokenspace_jax.classifier.label import _DISALLOWED
from tokenspace_jax.models.llama import Llama


@dataclasses.dataclass(frozen=True)
class LossWeights:
  label: float = 1.0
  entropy: float = 0.0
  entropy_warmup_steps: int = 0  # entropy weight ramps linearly from 0 over these steps
  kl: float = 0.0

  def entropy_at(self, step: jax.Array) -> jax.Array:
    if self.entropy_warmup_steps <= 0:
      return jnp.asarray(self.entropy, jnp.float32)
    ramp = jnp.minimum(1.0, (step + 1) / self.entropy_warmup_steps)
    return self.entropy * ramp


@dataclasses.dataclass(frozen=True)
class Objective:
  model: Llama
  weights: LossWeights
  temperature: float = 1.0
  full_vocab_answer: bool = True
  learn_answer_bias: bool = True

  def with_weights(self, weights: LossWeights) -> Objective:
    return dataclasses.replace(self, weights=weights)

  def log_p(self, label: dict, allowed: jax.Array) -> jax.Array:
    logits = jnp.where(allowed, label['logits'] / self.temperature, _DISALLOWED)
    return jax.nn.log_softmax(logits, axis=-1)

  def __call__(self, label: dict, params, caches: prefix.PrefixCaches, idx: jax.Array,
               targets: jax.Array, tail_ids: jax.Array, answer_ids: jax.Array,
               allowed: jax.Array, mean_log_prior: jax.Array, step: jax.Array):
    """Total loss and its terms for the examples ``idx`` (targets in {0, 1})."""
    log_p = self.log_p(label, allowed)  # [K, V]
    p = jnp.exp(log_p)
    # One embedding lookup per step, shared by the whole batch.
    embedding = p @ params['embed'].astype(p.dtype)
    bias = caches.answer_bias(label['answer_bias'] if self.learn_answer_bias else jnp.zeros(()),
                              idx)
    lp = prefix.answer_log_probs(
        self.model, params, caches.take(idx), embedding.astype(self.model.dtype), tail_ids,
        answer_ids, bias, self.full_vocab_answer)
    ce = -jnp.mean(targets * lp[:, 0] + (1 - targets) * lp[:, 1])
    entropy = -jnp.mean(jnp.sum(p * log_p, axis=-1))
    # The prior of the first position: the model's distribution at the slot (precomputed).
    log_q = mean_log_prior[None]
    if p.shape[0] > 1:
      label_prefix = jnp.argmax(log_p[:-1], axis=-1)
      later = prefix.label_prefix_log_priors(self.model, params, caches.take(idx), label_prefix)
      log_q = jnp.concatenate([log_q, jax.lax.stop_gradient(later.mean(axis=0))], axis=0)
    kl = jnp.mean(jnp.sum(p * (log_p - log_q), axis=-1))
    w_entropy = self.weights.entropy_at(step)
    total = self.weights.label * ce + w_entropy * entropy + self.weights.kl * kl
    accuracy = jnp.mean((lp[:, 0] > lp[:, 1]) == (targets > 0.5))
    return total, {'loss': total, 'answer_ce': ce, 'entropy': entropy, 'kl': kl,
                   'w_entropy': w_entropy, 'batch_accuracy': accuracy}


def objective_from_config(config, model: Llama) -> Objective:
  """The ``Objective`` of ``config.loss`` and ``config.label``."""
  weights = LossWeights(label=config.loss.w_label, entropy=config.loss.w_entropy,
                        entropy_warmup_steps=config.loss.entropy_warmup_steps, kl=config.loss.w_kl)
  return Objective(model, weights, temperature=config.label.temperature,
                   full_vocab_answer=config.loss.answer == 'full',
                   learn_answer_bias=config.label.learn_answer_bias)
