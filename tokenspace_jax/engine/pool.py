"""The pool: the examples, prefix caches and priors of F features, placed on the mesh.

Every feature of a run is asked the same prompt, so one ``prefix_caches`` pass computes the
shared instructions once and every example's own tokens once, for all features together. On a
mesh the examples are stored in the slots of a ``shard_layout`` (each data shard a block holding
its share of every feature's positives, negatives and held-out examples) and each shard draws
its share of every batch from its own block, so prefix caches never move between devices.

Examples are indexed feature-major (each feature's train examples, then its held-out ones);
``slot_of`` maps them to where their caches are. A batch job passes ``n_local`` so that group
after group has one shape and the step compiled for the first is reused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.classifier import notes, prefix, prompts
from tokenspace_jax.config_defaults import ConfigValueError
from tokenspace_jax.engine import scoring
from tokenspace_jax.engine.descent import DescentData
from tokenspace_jax.engine.rows import RowSpec
from tokenspace_jax.features import Example, Feature, FeatureError
from tokenspace_jax.models import LoadedModel
from tokenspace_jax.parallel import shard_layout, sharding

log = logging.getLogger('tokenspace_jax')


class PoolMemoryError(ConfigValueError):
  """The prefix caches would not fit; the message names the settings to lower."""


def stratified_pick(targets: np.ndarray, cap: int, seed: int) -> np.ndarray:
  """Indices of at most ``cap`` items, half positives where possible, in order; deterministic."""
  if cap <= 0 or len(targets) <= cap:
    return np.arange(len(targets))
  rng = np.random.default_rng(seed)
  pos, neg = np.flatnonzero(targets > 0.5), np.flatnonzero(targets <= 0.5)
  n_pos = min(len(pos), max(cap // 2, cap - len(neg)))
  return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False),
                                 rng.choice(neg, cap - n_pos, replace=False)]))


def capped(examples, cap: int, seed: int) -> list[Example]:
  targets = np.array([e.target for e in examples])
  return [examples[i] for i in stratified_pick(targets, cap, seed)]


def feature_splits(config: ConfigDict, feature: Feature) -> tuple[list[Example], list[Example]]:
  """The capped train and held-out examples of ``feature``; each split must hold both classes."""
  train = capped(feature.train, config.feature.max_train, config.seed)
  heldout = capped(feature.heldout, config.feature.max_heldout, config.seed + 1)
  for split, xs in (('train', train), ('held-out', heldout)):
    if not any(e.target > 0.5 for e in xs):
      raise FeatureError(f'The {split} split of feature {feature.name!r} has no positive '
                         'example: nothing to learn a label from. Lower feature.threshold or add '
                         'texts where the feature fires.')
    if not any(e.target <= 0.5 for e in xs):
      raise FeatureError(f'The {split} split of feature {feature.name!r} has no negative example.')
  return train, heldout


@dataclasses.dataclass
class Pool:
  features: list[Feature]
  examples: list[Example]  # feature-major: each feature's train examples, then its held-out ones
  groups: np.ndarray  # [examples] the feature of each example
  train: np.ndarray  # [examples] bool
  targets: np.ndarray  # [examples] float32 in {0, 1}
  layout: shard_layout.ExampleLayout
  template: prompts.PromptTemplate
  caches: prefix.PrefixCaches  # by slot, placed on the mesh
  slot_targets: np.ndarray  # [slots] float32
  tail_ids: np.ndarray
  answer_ids: np.ndarray  # [2]: yes, no
  allowed: np.ndarray  # [V] bool
  schedules: np.ndarray  # [F, steps, batch] local slots
  mean_log_priors: jax.Array  # [F, V] log q averaged over each feature's train examples
  # label ids -> [slots]: the contrast labels' margins, each against the others' baseline
  known_margins: dict[tuple, np.ndarray]
  mesh: jax.sharding.Mesh | None  # None: one device
  seconds: float
  notes: dict[str, str] = dataclasses.field(default_factory=dict)  # text -> the judge's note
  notes_seconds: float = 0.0  # the part of ``seconds`` spent reading the notes

  def split(self, feature: int, train: bool) -> np.ndarray:
    """Example indices of one split of one feature."""
    return np.flatnonzero((self.groups == feature) & (self.train == train))

  @property
  def slot_of(self) -> np.ndarray:
    return self.layout.slot_of()

  def descent_data(self, params, specs: list[RowSpec]) -> DescentData:
    """The step's data for label rows ``specs``: each row's schedule and prior its feature's."""
    rows = np.array([s.feature for s in specs])
    data = DescentData(params=params, caches=self.caches, targets=jnp.asarray(self.slot_targets),
                       schedule=jnp.asarray(self.schedules[rows]),
                       tail_ids=jnp.asarray(self.tail_ids), answer_ids=jnp.asarray(self.answer_ids),
                       allowed=jnp.asarray(self.allowed),
                       mean_log_prior=jnp.take(self.mean_log_priors, jnp.asarray(rows), axis=0))
    if self.mesh is None:
      return data
    try:
      return sharding.place_data(data, self.mesh)
    except sharding.MeshError as e:
      raise ConfigValueError(str(e)) from None


def build_pool(config: ConfigDict, lm: LoadedModel, features: list[Feature],
               mesh: jax.sharding.Mesh | None = None, n_local: int = 0,
               known_notes: dict[str, str] | None = None) -> Pool:
  """Caps and lays out the features' examples, computes their caches, priors and schedules.

  ``known_notes`` (text -> note) are notes read before, by this model under this note (a
  resumed run's); only the texts they lack are put to the judge."""
  start = time.perf_counter()
  examples, groups, train = [], [], []
  for f, feature in enumerate(features):
    tr, held = feature_splits(config, feature)
    examples += tr + held
    groups += [f] * (len(tr) + len(held))
    train += [True] * len(tr) + [False] * len(held)
  groups, train = np.asarray(groups), np.asarray(train)
  targets = np.array([e.target for e in examples], np.float32)
  on_mesh = mesh is not None and mesh.size > 1
  shards = mesh.shape[sharding.DATA] if on_mesh else 1
  try:
    layout = shard_layout.layout_examples(targets, train, shards, groups, n_local)
  except shard_layout.LayoutError as e:
    raise ConfigValueError(f'{e} (mesh.data={shards}).') from None
  template = prompts.template_from_config(config.prompt)
  note = config.prompt.get('note', '')
  read, notes_seconds = {}, 0.0
  if note:
    notes_start = time.perf_counter()
    texts = {e.text for e in examples}
    read = {t: a for t, a in (known_notes or {}).items() if t in texts}
    if texts - set(read):
      read.update(notes.read_texts(lm, sorted(texts - set(read)), note,
                                   batch=config.eval.prefix_batch_size))
    notes_seconds = time.perf_counter() - notes_start
  shown = (lambda e: notes.noted_text(e.text, note, read[e.text])) if note else (lambda e: e.text)
  enc = prompts.encode_prompts(
      template, lm.tokenizer, [(shown(examples[i]), examples[i].word) for i in layout.order],
      contexts=([examples[i].text for i in layout.order] if config.eval.share_text else None),
      blocks=shards)
  _check_context(lm, enc, config.label.num_tokens)
  _check_memory(lm, enc, layout.slots, shards, config)
  placement = ((lambda abstract: sharding.cache_shardings(abstract, mesh)) if on_mesh else None)
  contexts = (None if enc.context_of is None
              else (enc.context_ids, enc.context_mask, enc.context_of))
  caches = prefix.prefix_caches(lm.model, lm.params, enc.shared_ids, enc.prefix_ids,
                                enc.prefix_mask, chunk=config.eval.prefix_batch_size,
                                cache_dtype=cache_dtype(config, lm), out_shardings=placement,
                                contexts=contexts, blocks=shards)
  fraction = config.data.positive_fraction if config.data.sampling == 'balanced' else None
  try:
    schedules = np.stack([
        shard_layout.shard_schedule(layout, targets, config.steps, config.data.batch_size,
                                    fraction, config.seed, group=f)
        for f in range(len(features))])
  except shard_layout.LayoutError as e:
    raise ConfigValueError(f'{e} (mesh.data={shards}, data.batch_size='
                           f'{config.data.batch_size}).') from None
  slot_of = layout.slot_of()
  priors = jnp.stack([
      jnp.take(caches.log_prior, jnp.asarray(slot_of[np.flatnonzero((groups == f) & train)]),
               axis=0).mean(axis=0) for f in range(len(features))])
  caches = caches.replace(log_prior=None)  # only the means are read from here on
  allowed = label_lib.allowed_mask(lm.tokenizer, lm.config.vocab_size, config.label.mask_special)
  tail_ids = np.asarray(enc.tail_ids)
  answer_ids = np.asarray([enc.yes_id, enc.no_id], np.int32)
  known = {}
  if config.contrast.labels:
    baseline, known = contrast_baseline(config, lm, caches, tail_ids, answer_ids, allowed,
                                        placement)
    caches = caches.replace(baseline=baseline)
  pool = Pool(features=list(features), examples=examples, groups=groups, train=train,
              targets=targets, layout=layout, template=template, caches=caches,
              slot_targets=layout.arrange(targets), tail_ids=tail_ids,
              answer_ids=answer_ids, allowed=allowed,
              schedules=schedules, mean_log_priors=priors, known_margins=known,
              mesh=mesh if on_mesh else None, seconds=0.0, notes=read,
              notes_seconds=notes_seconds)
  jax.block_until_ready((caches, priors))  # so the time reported is the work done
  pool.seconds = time.perf_counter() - start
  return pool


def contrast_labels(config: ConfigDict, tokenizer, allowed: np.ndarray) -> list[list[int]]:
  """The ``contrast.labels`` random labels (of ``label.num_tokens`` tokens) whose mean margin is
  each example's baseline. They are the verdict's random labels (``scoring.verdict_random_tokens``
  draws the same word-like tokens in the same order), followed by more of that draw when there
  are more contrast labels than ``eval.num_random``."""
  k = config.label.num_tokens
  count = max(config.contrast.labels, config.eval.num_random) * k
  ids = scoring.random_label_tokens(allowed, tokenizer, count, config.seed)
  return [ids[j:j + k] for j in range(0, len(ids) - k + 1, k)][:config.contrast.labels]


def contrast_baseline(config: ConfigDict, lm: LoadedModel, caches: prefix.PrefixCaches,
                      tail_ids: np.ndarray, answer_ids: np.ndarray, allowed: np.ndarray,
                      placement=None) -> tuple[jax.Array, dict[tuple, np.ndarray]]:
  """Every example's baseline, [slots] its mean yes/no margin under ``contrast_labels``
  (computed once, with the raw scorer, and placed like the caches); and each contrast label's
  margins [slots] against the baseline of the *other* contrast labels, by its ids.

  A label in the baseline is never compared with a baseline that contains it: with R labels of
  raw margins m_r and β their mean, label r's margin against the mean of the others is
  m_r − (Rβ − m_r)/(R − 1) = R/(R − 1) · (m_r − β). Those margins are what the verdict's random
  labels are scored by (``scoring.LabelScorer(known=...)``), so they are not run again.
  """
  scorer = scoring.LabelScorer(lm.model, lm.params, caches, tail_ids, answer_ids,
                               config.loss.answer == 'full', config.eval.batch_size)
  labels = contrast_labels(config, lm.tokenizer, allowed)
  raw = scorer.margins(labels, np.arange(caches.valid.shape[0]))  # [R, slots]
  baseline = raw.mean(axis=0)
  r = len(labels)
  known = {scoring.label_key(x): (r / (r - 1)) * (m - baseline)
           for x, m in zip(labels, raw, strict=True)} if r > 1 else {}
  if placement is None:
    return jnp.asarray(baseline), known
  abstract = caches.replace(baseline=jax.ShapeDtypeStruct(baseline.shape, baseline.dtype))
  return jax.device_put(baseline, placement(abstract).baseline), known


def _check_context(lm: LoadedModel, enc: prompts.EncodedPrompts, label_tokens: int):
  length = len(enc.shared_ids) + int(enc.own_lengths.max()) + label_tokens + len(enc.tail_ids)
  limit = lm.config.max_position_embeddings
  if length > limit:
    raise FeatureError(f'The longest prompt is {length} tokens, beyond the model\'s context of '
                       f'{limit}. Shorten the texts (feature.window) or the few-shot prompt.')


def cache_dtype(config: ConfigDict, lm: LoadedModel):
  """The dtype the prefix caches are kept in: ``model.cache_dtype``, else the activations'."""
  return jnp.dtype(config.model.cache_dtype or lm.model.dtype)


def cache_bytes(lm: LoadedModel, enc: prompts.EncodedPrompts, slots: int, dtype,
                blocks: int = 1) -> int:
  """Bytes the prefix caches of ``slots`` examples take: keys and values of their own tokens
  and of their contexts (packed, in ``blocks`` shares), their slot priors (one vocabulary row
  each, held until the pool has averaged them), the validity masks and indices, with the keys
  and values in ``dtype``."""
  c = lm.config
  itemsize = jnp.dtype(dtype).itemsize
  kv = lambda mask: (2 * c.num_layers * prefix.pack_left_padded(mask, blocks)[1]
                     * c.num_kv_heads * c.head_dim * itemsize)
  width = enc.prefix_ids.shape[1]
  total = kv(enc.prefix_mask) + slots * (4 * c.vocab_size + width + 4)
  if enc.context_ids is not None:
    contexts, context_width = enc.context_ids.shape
    total += kv(enc.context_mask) + contexts * (context_width + 4) + 4 * slots
  return total


def _available_bytes() -> int | None:
  device = jax.local_devices()[0]
  if device.platform == 'cpu':
    try:
      with open('/proc/meminfo') as f:
        for line in f:
          if line.startswith('MemAvailable:'):
            return int(line.split()[1]) * 1024
    except OSError:
      return None
    return None
  stats = device.memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  return None


def _check_memory(lm, enc, slots: int, shards: int, config: ConfigDict):
  need = cache_bytes(lm, enc, slots, cache_dtype(config, lm), shards)
  per_device = need // shards
  if os.environ.get('TOKENSPACE_JAX_SKIP_MEMORY_CHECK'):
    return
  free = _available_bytes()
  if free is not None and per_device > 0.9 * free:
    gb = lambda b: f'{b / 2**30:.1f} GB'
    f = config.feature
    # Only settings this command has: main has no batch section.
    per_step = (f'batch.features_per_step ({config.batch.features_per_step}), '
                if 'batch' in config else '')
    raise PoolMemoryError(
        f'The prefix caches of {slots} examples (up to {int(enc.own_lengths.max())} tokens '
        f'each) need about {gb(per_device)} per device, but only {gb(free)} is free. Lower '
        f'feature.max_train ({f.max_train}) or feature.max_heldout ({f.max_heldout}), '
        f'{per_step}or feature.window ({f.window}); or use more data shards (mesh.data).')
