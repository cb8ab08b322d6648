"""The data of one stacked step: several features' examples in one prefix-cache pool.

Every feature of a group is asked the same prompt, so one ``prefix_caches`` call computes the
shared instructions once and every example's own tokens once; a feature's schedule and
evaluation name its examples by their index into the pool. The pool is padded to a number of
examples fixed by the config, so that group after group has the same shapes and the step,
compiled once, is reused instead of recompiled per group (the prompt width, a multiple of 16,
still varies with the longest text, but over few values).

Memory: the pool holds every example's keys and values, about 3 MB per example for
SmolLM2-135M in float32 (30 layers, 64 prompt tokens), so 4 features of 320 examples take 4 GB,
and ``prefix_caches`` briefly needs twice that while it joins its chunks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from tokenspace_jax.classifier import prefix, prompts
from tokenspace_jax.engine import descent
from tokenspace_jax.features import BalancedSampler, Feature
from tokenspace_jax.labeling import _capped
from tokenspace_jax.models import LoadedModel


@dataclasses.dataclass
class FeatureGroup:
  feature_ids: list
  features: list[Feature]
  data: descent.DescentData  # schedule [R, steps, batch], mean_log_prior [R, V]; the rest shared
  train_idx: list[np.ndarray]  # pool indices of each feature's train examples
  heldout_idx: list[np.ndarray]  # ... and of its held-out examples
  targets: np.ndarray  # [pool] float32, the host copy of data.targets


def pool_capacity(config: ConfigDict) -> int:
  """Examples in a full group's pool: a fixed number when both splits are capped, else 0."""
  f = config.feature
  if f.max_train > 0 and f.max_heldout > 0:
    return config.batch.features_per_step * (f.max_train + f.max_heldout)
  return 0


def prepare_group(config: ConfigDict, lm: LoadedModel, template: prompts.PromptTemplate,
                  allowed: np.ndarray, feature_ids: list, features: list[Feature]) -> FeatureGroup:
  pool, train_idx, heldout_idx, schedules = [], [], [], []
  fraction = config.data.positive_fraction if config.data.sampling == 'balanced' else None
  for feature in features:
    # The same caps and seeds as a single-feature run (labeling.prepare).
    train = _capped(feature.train, config.feature.max_train, config.seed)
    heldout = _capped(feature.heldout, config.feature.max_heldout, config.seed + 1)
    start = len(pool)
    index = {e: start + i for i, e in reversed(list(enumerate(train)))}
    sampler = BalancedSampler(train, config.data.batch_size, positive_fraction=fraction,
                              seed=config.seed)
    schedules.append([[index[e] for e in sampler.batch(t)] for t in range(config.steps)])
    train_idx.append(np.arange(start, start + len(train)))
    heldout_idx.append(np.arange(start + len(train), start + len(train) + len(heldout)))
    pool += train + heldout
  enc = prompts.encode_prompts(template, lm.tokenizer, [(e.text, e.word) for e in pool])
  caches = prefix.prefix_caches(lm.model, lm.params, enc.shared_ids, enc.prefix_ids,
                                    enc.prefix_mask, chunk=config.eval.batch_size)
  size = pool_capacity(config)
  if size < len(pool):  # uncapped splits: round up, so similar groups still share a shape
    size = -(-len(pool) // 256) * 256
  caches = pad_pool(caches, size)
  targets = np.zeros(size, np.float32)
  targets[:len(pool)] = [e.target for e in pool]
  priors = jnp.stack([caches.log_prior[idx].mean(axis=0) for idx in train_idx])
  data = descent.DescentData(
      params=lm.params, caches=caches, targets=jnp.asarray(targets),
      schedule=jnp.asarray(np.array(schedules, np.int32)), tail_ids=jnp.asarray(enc.tail_ids),
      answer_ids=jnp.asarray([enc.yes_id, enc.no_id], jnp.int32), allowed=jnp.asarray(allowed),
      mean_log_prior=priors)
  jax.block_until_ready(data)
  return FeatureGroup(feature_ids=list(feature_ids), features=list(features), data=data,
                      train_idx=train_idx, heldout_idx=heldout_idx, targets=targets)


def pad_pool(caches: prefix.PrefixCaches, examples: int) -> prefix.PrefixCaches:
  """``caches`` with empty examples appended up to ``examples`` (never scheduled nor scored)."""
  extra = examples - caches.valid.shape[0]
  if extra == 0:
    return caches  # no copy of what may be gigabytes
  pad = lambda x, axis: jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])
  return caches.replace(k=pad(caches.k, 1), v=pad(caches.v, 1), valid=pad(caches.valid, 0),
                        log_prior=pad(caches.log_prior, 0))
