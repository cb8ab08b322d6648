"""Labeling one feature end to end: data, prompts, caches, descent, evaluation, report.

``run(config, workdir)`` is what ``python -m tokenspace_jax.main`` calls, and what notebooks and
batch jobs call with a model they already loaded. A workdir is the unit of resumption: rerun the
same config on it and the run continues from its latest checkpoint (or reports the finished
result), reaching the same final state as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.classifier import prefix, prompts
from tokenspace_jax.classifier.objective import LossWeights, Objective
from tokenspace_jax.engine import descent, scoring
from tokenspace_jax.features import (
  SYNTHETIC_FEATURES,
  BalancedSampler,
  Example,
  Feature,
  FeatureError,
  load_records,
  load_synthetic_feature,
)
from tokenspace_jax.models import LoadedModel, load_model
from tokenspace_jax.models.loading.param_mapping import abstract_params
from tokenspace_jax.outputs import report
from tokenspace_jax.outputs.checkpoint import Checkpointer, StopFlag
from tokenspace_jax.parallel import distributed, shard_layout, sharded_step, sharding

log = logging.getLogger('tokenspace_jax')

# Config keys that may differ between a run and its resumption.
_RESUMABLE_CHANGES = ('steps', 'checkpoint_every', 'early_stop', 'eval', 'progress')


MAX_LABEL_TOKENS = 8


def confidence(record: dict) -> float:
  """The label's weakest position: the smallest top probability over its tokens."""
  return min(record['label_p']) if 'label_p' in record else record['top'][0][1]


class RunInterrupted(RuntimeError):
  """SIGTERM or Ctrl-C: a checkpoint was written; rerunning the same command resumes."""


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the last good state was kept in a checkpoint."""


class ConfigMismatchError(ValueError):
  pass


class ConfigValueError(ValueError):
  """A config value outside what the run supports; the message names the key and the choices."""


_CHOICES = {
    'loss.answer': ('full', 'binary'),
    'optim.name': ('adam', 'adamw'),
    'optim.schedule': ('constant', 'cosine'),
    'data.sampling': ('balanced', 'natural'),
    'label.init': ('zeros', 'normal', 'prior', 'word'),
    'feature.negatives': ('hard', 'natural', 'easy'),
    'model.dtype': ('float32', 'bfloat16'),
}


def validate_config(config: ConfigDict):
  """Checks the values a run would otherwise reject deep inside; before any model is loaded."""
  for key, choices in _CHOICES.items():
    section, name = key.split('.')
    value = config[section][name]
    if value not in choices:
      raise ConfigValueError(f'{key}={value!r} is not one of {", ".join(choices)}.')
  if config.model.param_dtype not in ('', 'float32', 'bfloat16'):
    raise ConfigValueError(f'model.param_dtype={config.model.param_dtype!r} is not one of '
                           '"", float32, bfloat16.')
  if not 1 <= config.label.num_tokens <= MAX_LABEL_TOKENS:
    raise ConfigValueError(f'label.num_tokens={config.label.num_tokens} must be between 1 and '
                           f'{MAX_LABEL_TOKENS}.')
  positive = {'steps': config.steps, 'data.batch_size': config.data.batch_size,
              'checkpoint_every': config.checkpoint_every, 'optim.lr': config.optim.lr,
              'eval.batch_size': config.eval.batch_size}
  for key, value in positive.items():
    if not value > 0:
      raise ConfigValueError(f'{key}={value} must be positive.')
  if not 0 < config.data.positive_fraction < 1:
    raise ConfigValueError(f'data.positive_fraction={config.data.positive_fraction} must be '
                           'strictly between 0 and 1.')
  for axis in ('data', 'model'):
    size = config.mesh[axis]
    if not (size == -1 or size >= 1):
      raise ConfigValueError(f'mesh.{axis}={size} must be a device count or -1 (the remaining '
                             'devices).')
  if not config.feature.name and not config.feature.records:
    raise ConfigValueError('Set feature.name (a built-in feature) or feature.records (an '
                           'activation-records .jsonl file).')


@dataclasses.dataclass
class Prepared:
  """Everything computed once before descent.

  On a mesh the examples are stored in the slots of ``layout`` (each data shard a block holding
  its share of positives, negatives and held-out examples); ``data`` is indexed by slot,
  ``examples`` and ``targets`` by example. On one device the two orders are the same.
  """

  feature: Feature
  examples: list[Example]  # train examples first, then held-out ones
  n_train: int
  targets: np.ndarray  # [examples] by example
  layout: shard_layout.ExampleLayout
  template: prompts.PromptTemplate
  data: descent.DescentData
  allowed: np.ndarray
  answer_ids: tuple[int, int]
  seconds: float


def load_feature(cfg: ConfigDict, tokenizer) -> Feature:
  if cfg.records:
    return load_records(cfg.records, tokenizer, threshold=cfg.threshold,
                        reference_word=cfg.reference_word, seed=cfg.split_seed,
                        heldout_fraction=cfg.heldout_fraction)
  if cfg.name not in SYNTHETIC_FEATURES:
    raise FeatureError(f'Unknown feature {cfg.name!r}. Built-in features: '
                       f'{", ".join(SYNTHETIC_FEATURES)}; or set feature.records to an '
                       'activation-records .jsonl file.')
  feature = load_synthetic_feature(cfg.name, negatives=cfg.negatives)
  if cfg.reference_word:
    feature = dataclasses.replace(feature, reference_word=cfg.reference_word)
  return feature


def _stratified_pick(targets: np.ndarray, cap: int, seed: int) -> np.ndarray:
  """Indices of at most ``cap`` items, half positives where possible, in order; deterministic."""
  if cap <= 0 or len(targets) <= cap:
    return np.arange(len(targets))
  rng = np.random.default_rng(seed)
  pos, neg = np.flatnonzero(targets > 0.5), np.flatnonzero(targets <= 0.5)
  n_pos = min(len(pos), max(cap // 2, cap - len(neg)))
  return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False),
                                 rng.choice(neg, cap - n_pos, replace=False)]))


def _capped(examples, cap: int, seed: int) -> list[Example]:
  targets = np.array([e.target for e in examples])
  return [examples[i] for i in _stratified_pick(targets, cap, seed)]


def prepare(config: ConfigDict, lm: LoadedModel, mesh: jax.sharding.Mesh | None = None,
            ) -> Prepared:
  """Data, prompts, prefix caches and the batch schedule; placed on ``mesh`` when given."""
  start = time.perf_counter()
  feature = load_feature(config.feature, lm.tokenizer)
  train = _capped(feature.train, config.feature.max_train, config.seed)
  heldout = _capped(feature.heldout, config.feature.max_heldout, config.seed + 1)
  for split, xs in (('train', train), ('held-out', heldout)):
    if not any(e.target > 0.5 for e in xs):
      raise FeatureError(f'The {split} split of feature {feature.name!r} has no positive '
                         'example: nothing to learn a label from. Lower feature.threshold or add '
                         'texts where the feature fires.')
    if not any(e.target <= 0.5 for e in xs):
      raise FeatureError(f'The {split} split of feature {feature.name!r} has no negative example.')
  examples = train + heldout
  targets = np.array([e.target for e in examples], np.float32)
  shards = 1 if mesh is None else mesh.shape[sharding.DATA]
  layout = shard_layout.layout_examples(targets, len(train), shards)
  template = prompts.template_from_config(config.prompt)
  enc = prompts.encode_prompts(template, lm.tokenizer,
                               [(examples[i].text, examples[i].word) for i in layout.order])
  # On a mesh each device holds only its block of the caches, written there chunk by chunk.
  placement = ((lambda abstract: sharding.cache_shardings(abstract, mesh))
               if mesh is not None and mesh.size > 1 else None)
  caches = prefix.prefix_caches(lm.model, lm.params, enc.shared_ids, enc.prefix_ids,
                                    enc.prefix_mask, chunk=config.eval.batch_size,
                                    out_shardings=placement)
  allowed = (label_lib.allowed_tokens(lm.tokenizer, lm.config.vocab_size)
             if config.label.mask_special else np.ones(lm.config.vocab_size, bool))
  fraction = config.data.positive_fraction if config.data.sampling == 'balanced' else None
  if shards == 1:
    index = {e: i for i, e in reversed(list(enumerate(train)))}
    sampler = BalancedSampler(train, config.data.batch_size, positive_fraction=fraction,
                              seed=config.seed)
    schedule = np.array([[index[e] for e in sampler.batch(t)] for t in range(config.steps)],
                        np.int32)
  else:  # each data shard draws its share of every batch from its own block of examples
    try:
      schedule = shard_layout.shard_schedule(layout, targets, config.steps,
                                             config.data.batch_size, fraction, config.seed)
    except shard_layout.LayoutError as e:
      raise ConfigValueError(f'{e} (mesh.data={shards}, data.batch_size='
                             f'{config.data.batch_size}).') from None
  train_slots = np.flatnonzero(~layout.padding & (layout.order < len(train)))
  data = descent.DescentData(
      params=lm.params, caches=caches, targets=jnp.asarray(layout.arrange(targets)),
      schedule=jnp.asarray(schedule), tail_ids=jnp.asarray(enc.tail_ids),
      answer_ids=jnp.asarray([enc.yes_id, enc.no_id], jnp.int32),
      allowed=jnp.asarray(allowed),
      mean_log_prior=jnp.take(caches.log_prior, train_slots, axis=0).mean(axis=0))
  if mesh is not None and mesh.size > 1:
    data = place_on_mesh(data, mesh)
  jax.block_until_ready(data)  # so the time reported is the work done, not its dispatch
  return Prepared(feature=feature, examples=examples, n_train=len(train), targets=targets,
                  layout=layout, template=template, data=data, allowed=allowed,
                  answer_ids=(enc.yes_id, enc.no_id), seconds=time.perf_counter() - start)


def place_on_mesh(data: descent.DescentData, mesh: jax.sharding.Mesh) -> descent.DescentData:
  """``data`` with its examples split along ``data`` and its weights placed by the rule table.

  The weights and caches are moved device to device (a no-op where ``load_model`` and
  ``prefix_caches`` already placed them); the small rest goes through the host, each process
  uploading only the slices its own devices hold.
  """
  try:
    shardings = sharding.data_shardings(data, mesh)
  except sharding.MeshError as e:
    raise ConfigValueError(str(e)) from None
  on_device = lambda d: (d.params, d.caches)
  rest = distributed.put_global(jax.device_get(data.replace(params={}, caches=None)),
                                shardings.replace(params={}, caches=None))
  params, caches = jax.device_put(on_device(data), on_device(shardings))
  return rest.replace(params=params, caches=caches)


def run_mesh(config: ConfigDict) -> jax.sharding.Mesh:
  """The mesh of ``config.mesh`` over every device of the job."""
  try:
    return sharding.make_mesh(config.mesh)
  except sharding.MeshError as e:
    raise ConfigValueError(f'{e} (config.mesh).') from None


def make_objective(config: ConfigDict, lm: LoadedModel) -> Objective:
  weights = LossWeights(label=config.loss.w_label, entropy=config.loss.w_entropy,
                        entropy_warmup_steps=config.loss.entropy_warmup_steps, kl=config.loss.w_kl)
  return Objective(lm.model, weights, temperature=config.label.temperature,
                   full_vocab_answer=config.loss.answer == 'full',
                   learn_answer_bias=config.label.learn_answer_bias)


def initial_label(config: ConfigDict, lm: LoadedModel, prep: Prepared) -> dict:
  word_id = (label_lib.token_id_for_word(lm.tokenizer, config.label.init_word)
             if config.label.init == 'word' else None)
  return label_lib.init_label(config.label, lm.config.vocab_size,
                              jax.random.PRNGKey(config.seed),
                              prior_logits=np.asarray(prep.data.mean_log_prior), word_id=word_id)


def _check_workdir_config(workdir: str, config: ConfigDict):
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    # A workdir written before a config key existed ran with that key's default.
    from tokenspace_jax.config_defaults import get_base_config
    for key, value in json.loads(get_base_config().to_json()).items():
      if key not in previous and current.get(key) == value:
        previous[key] = value
    strip = lambda d: {k: v for k, v in d.items() if k not in _RESUMABLE_CHANGES}
    if strip(previous) != strip(current):
      diff = sorted(k for k in set(previous) | set(current)
                    if k not in _RESUMABLE_CHANGES and previous.get(k) != current.get(k))
      raise ConfigMismatchError(
          f'{workdir} holds a run with a different config (differs in: {diff}). Resuming would '
          'mix two experiments: use a new --workdir, or the same config to resume.')
  if distributed.is_main_process():
    report.write_json(path, current)


def run(config: ConfigDict, workdir: str, lm: LoadedModel | None = None,
        progress: bool | None = None) -> dict:
  """Labels the feature of ``config``; returns (and writes) the result.

  ``progress`` shows a progress bar (default: ``config.progress``).
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  result_path = os.path.join(workdir, 'result.json')
  _check_workdir_config(workdir, config)
  if os.path.exists(result_path):
    with open(result_path) as f:
      log.info('%s already holds a finished run; not recomputing.', result_path)
      return json.load(f)
  wall_start = time.perf_counter()
  mesh = run_mesh(config)
  # One device: the plain single-device step, bit for bit what runs without a mesh.
  on_mesh = mesh.size > 1
  if lm is None:
    dtype = jnp.dtype(config.model.dtype)
    shardings = ((lambda model: sharding.param_shardings(abstract_params(model), mesh))
                 if on_mesh else None)
    lm = load_model(config.model.source, dtype=dtype, shardings=shardings,
                    param_dtype=jnp.dtype(config.model.param_dtype or config.model.dtype))
    log.info('Loaded %s in %.1f s.', lm.path, lm.load_seconds)
  if on_mesh:
    log.info('Mesh %s over %d devices (%s).', dict(mesh.shape), mesh.size,
             mesh.devices.flat[0].platform)
  prep = prepare(config, lm, mesh if on_mesh else None)
  log.info('Feature %s: %d train / %d held-out examples; caches and priors in %.1f s.',
           prep.feature.name, prep.n_train, len(prep.examples) - prep.n_train, prep.seconds)
  objective = make_objective(config, lm)
  optimizer = descent.make_optimizer(config.optim)
  state = descent.init_state(initial_label(config, lm, prep), optimizer)
  if on_mesh:
    step_fn = sharded_step.make_sharded_step(objective, optimizer, mesh, prep.data)
    state = jax.device_put(state, sharding.replicated(mesh))
  else:
    step_fn = descent.make_step(objective, optimizer)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint_every)
  restored = ckpt.restore(state)
  if restored is not None:
    state = restored
    log.info('Resumed from the checkpoint at step %d.', int(state['step']))
  start_step = int(state['step'])
  main_process = distributed.is_main_process()
  trajectory = report.Trajectory(os.path.join(workdir, 'trajectory.jsonl'), start_step,
                                 write=main_process)
  try:
    show = (config.progress if progress is None else progress) and main_process
    loop = _descend(config, lm, prep, step_fn, state, ckpt, trajectory, show)
  finally:
    trajectory.close()
    ckpt.close()
  log.info('Descent: %d steps in %.1f s (first step, with compilation, %.1f s).',
           loop['steps_run'], loop['descent_seconds'], loop['compile_seconds'] or 0.0)
  eval_start = time.perf_counter()
  result = _finish(config, lm, prep, loop, trajectory.records, workdir,
                   time.perf_counter() - wall_start)
  log.info('Evaluation and report in %.1f s.', time.perf_counter() - eval_start)
  if main_process:
    report.write_json(result_path, result)
  return result


def _descend(config, lm, prep, step_fn, state, ckpt, trajectory, progress):
  from tqdm import tqdm

  tok = lm.tokenizer
  decoded = {}
  decode = lambda i: decoded.setdefault(i, tok.decode([i]))
  records = trajectory.records
  prior_elapsed = records[-1]['elapsed'] if records else 0.0
  above = 0
  for r in reversed(records):  # the early-stop streak survives a resume
    if confidence(r) < config.early_stop.prob:
      break
    above += 1
  t0, compile_seconds = time.perf_counter(), None
  start = int(state['step'])
  stopped_early = False
  with StopFlag().installed() as stop, tqdm(total=config.steps, initial=start,
                                            disable=not progress, dynamic_ncols=True) as bar:
    for t in range(start, config.steps):
      state, metrics = step_fn(state, prep.data)
      m = jax.device_get(metrics)
      if compile_seconds is None:
        compile_seconds = time.perf_counter() - t0
      if not m['ok']:
        ckpt.save(t, state, force=True)
        raise NonFiniteLossError(
            f'The loss became {m["loss"]} at step {t + 1}; stopped. The last good state (step '
            f'{t}) is kept in {ckpt.directory}. Lower optim.lr, or check the model '
            'weights and dtype (bfloat16 overflows more easily than float32).')
      top = [[decode(int(i)), float(p)] for i, p in zip(m['top_ids'], m['top_p'], strict=True)]
      record = {k: float(m[k]) for k in ('loss', 'answer_ce', 'entropy', 'kl', 'w_entropy',
                                         'batch_accuracy', 'answer_bias')}
      record.update(step=t + 1, top=top,
                    label=tok.decode([int(i) for i in m['label_ids']]),
                    label_p=[float(p) for p in m['label_p']],
                    elapsed=prior_elapsed + time.perf_counter() - t0)
      trajectory.append(record)
      bar.set_postfix_str(f'loss {record["loss"]:.3f} label {record["label"]!r} '
                          f'p={confidence(record):.2f}')
      bar.update(1)
      ckpt.save(t + 1, state)
      above = above + 1 if confidence(record) >= config.early_stop.prob else 0
      if config.early_stop.prob > 0 and above >= config.early_stop.patience:
        stopped_early = True
        break
      if stop:
        ckpt.save(t + 1, state, force=True)
        raise RunInterrupted(
            f'{stop.signal_name} received: stopped after step {t + 1} with a checkpoint. Rerun '
            'the same command to resume.')
  final_step = int(state['step'])
  ckpt.save(final_step, state, force=True)
  descent_seconds = time.perf_counter() - t0
  return {'state': state, 'stopped_early': stopped_early, 'compile_seconds': compile_seconds,
          'descent_seconds': descent_seconds, 'steps_run': final_step - start}


def baseline_labels(config: ConfigDict, tok, prep: Prepared, k: int) -> list[tuple]:
  """(ids, text, role) of the labels a found one is compared with: the human reference word
  and ``eval.num_random`` random ones, each filling a slot of ``k`` tokens (an int id for k=1)."""
  labels = []
  ref_word = prep.feature.reference_word
  if ref_word and k > 1:  # any length: a multi-token slot takes the word's own tokens
    ids = tok(' ' + ref_word.strip(), add_special_tokens=False)['input_ids']
    labels.append((ids, ' ' + ref_word.strip(), 'reference'))
  elif ref_word:
    # The spelling the slot expects first: with a leading space after "Concept:", bare after a
    # quote.
    spaced = not prep.template.user.split('{concept}')[0].endswith(('"', "'"))
    variants = [' ' + ref_word.strip(), ref_word.strip()]
    for variant in (variants if spaced else variants[::-1]):
      try:
        labels.append((label_lib.token_id_for_word(tok, variant), variant, 'reference'))
        break
      except label_lib.LabelError:
        continue
    else:
      log.warning('Reference word %r is not a single token; not scored.', ref_word)
  randoms = scoring.random_label_tokens(prep.allowed, tok, config.eval.num_random * k,
                                         config.seed)
  for j in range(0, len(randoms) - k + 1, k):
    ids = randoms[j:j + k]
    labels.append((ids if k > 1 else ids[0], tok.decode(ids), 'random'))
  return labels


def _finish(config, lm, prep, loop, records, workdir, wall_seconds) -> dict:
  tok = lm.tokenizer
  state = loop['state']
  p = np.asarray(jax.nn.softmax(jnp.where(prep.data.allowed,
                                          state['label']['logits'] / config.label.temperature,
                                          -1e9), axis=-1))  # [K, V]
  top = label_lib.top_tokens(p[0], tok, 10)
  multi = p.shape[0] > 1
  if multi:  # the label is the most probable token of each position, read as one text
    found_ids = [int(i) for i in p.argmax(axis=-1)]
    found_id, found_token = found_ids, tok.decode(found_ids)
    found_p = float(p.max(axis=-1).min())
  else:
    found_id, found_token, found_p = top[0]

  scorer = scoring.LabelScorer(lm.model, lm.params, prep.data.caches, prep.data.tail_ids,
                                prep.data.answer_ids, config.loss.answer == 'full',
                                config.eval.batch_size)
  # Examples are picked by example index and scored at their slots in the caches.
  targets, slot = prep.targets, prep.layout.slot_of()
  calib = _stratified_pick(targets[:prep.n_train], config.eval.calibration_examples,
                           config.seed + 2)
  held = np.arange(prep.n_train, len(prep.examples))
  labels = [(found_id, found_token, 'found')] + baseline_labels(config, tok, prep, p.shape[0])
  scores = [scorer.score(i, s, role, slot[calib], targets[calib], slot[held], targets[held])
            for i, s, role in labels]
  verdict = scoring.verdict(scores)
  steps_done = int(state['step'])
  p90 = next((r['step'] for r in records if confidence(r) >= 0.9), None)
  last = records[-1] if records else {}
  descent_time = last.get('elapsed', 0.0)
  result = {
      'label': found_token, 'token_id': found_id, 'probability': found_p,
      'top10': [{'token': s, 'id': i, 'p': q} for i, s, q in top],  # of the first position
      'positions': [[{'token': s, 'id': i, 'p': q} for i, s, q in label_lib.top_tokens(row, tok, 5)]
                    for row in p] if multi else None,
      'identifiable': verdict['identifiable'], 'verdict': verdict['message'],
      'steps': steps_done, 'stopped_early': loop['stopped_early'], 'steps_to_p90': p90,
      'wall_seconds': wall_seconds, 'descent_seconds': descent_time,
      'steps_per_second': steps_done / descent_time if descent_time else None,
      'compile_seconds': loop['compile_seconds'],
      'final_losses': {k: last.get(k) for k in ('loss', 'answer_ce', 'entropy', 'kl',
                                                'answer_bias')},
      'heldout': {'examples': int(len(held)), 'positives': int(targets[held].sum()),
                  'scores': [s.as_dict() for s in scores], 'verdict': verdict},
      'train': {'examples': prep.n_train, 'positives': int(targets[:prep.n_train].sum())},
      'feature': prep.feature.name, 'reference_word': prep.feature.reference_word,
      'model': lm.path,
      'config': json.loads(config.to_json()),
  }
  if distributed.is_main_process():
    report.plot_trajectory(records, os.path.join(workdir, 'trajectory.png'),
                           f'{prep.feature.name}: {found_token!r} p={found_p:.2f}')
  return result


def summary(result: dict) -> str:
  """A few lines for the terminal: the label, the evidence, and the verdict."""
  r = result
  lines = [f'Feature {r["feature"]!r}: label {r["label"]!r} (p={r["probability"]:.3f}, '
           f'{r["steps"]} steps, {r["wall_seconds"]:.0f} s)',
           '  held-out    token                 AUROC  bal.acc  acc']
  for s in r['heldout']['scores']:
    lines.append(f'  {s["role"]:<10}  {s["token"]!r:<20} {s["auroc"]:6.3f}  '
                 f'{s["balanced_accuracy"]:6.3f}  {s["accuracy"]:5.3f}')
  lines.append('  ' + r['verdict'])
  return '\n'.join(lines)
