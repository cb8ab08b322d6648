"""Label every feature of an activation-records file, several features per descent step.

    python -m tokenspace_jax.batch --config=configs/batch.py --config.features=FILE.jsonl \\
        --workdir=DIR

Records carry a ``feature_id`` (see ``features.grouped_records``). Features, in the order their
ids first appear, form groups of ``batch.features_per_step``; a group's labels are descended
together, one vmapped step for all (``stacked_step``), over one pool of prefix caches
(``feature_group``). What DIR holds:

* ``labels.jsonl``: one line per finished feature, written (flushed and fsynced) as its group
  finishes: the label token and id, its probability, the top 5, held-out AUROC of the found,
  reference and random labels, the verdict and the number of steps. A feature whose loss became
  NaN or infinite gets a line with an ``error`` field instead, and is not retried.
* ``skipped.jsonl``: what was not labeled, rewritten at every start: malformed records (with
  their line number) and features that cannot be learned (no positive or no negative example in
  a split), one JSON object each with an ``error`` message.
* ``groups/NNNNN/``: the Orbax checkpoints of the group in progress, removed once all its lines
  are written; ``config.json``: the config, checked on restart.

Killed at any point (SIGTERM, as a preemption does) and rerun with the same command, the job
skips the features already in labels.jsonl, resumes the unfinished group from its checkpoint,
and writes only the lines still missing, so the final labels.jsonl equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from ml_collections import ConfigDict

from tokenspace_jax import feature_group, group_eval, labeling
from tokenspace_jax import main as single
from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.classifier import prompts
from tokenspace_jax.engine import descent, scoring
from tokenspace_jax.features.grouped_records import read_grouped_records
from tokenspace_jax.models import LoadedModel, load_model
from tokenspace_jax.outputs.checkpoint import Checkpointer, StopFlag
from tokenspace_jax.outputs.labels_file import LabelsFile
from tokenspace_jax.stacked_step import init_stacked_state, make_stacked_step, stack

log = logging.getLogger('tokenspace_jax')

# A row's status, kept in its group's checkpoint.
RUNNING, STOPPED_EARLY, NON_FINITE = 0, 1, 2


class BatchError(ValueError):
  """A workdir that does not match the records file; the message says what to do."""


USER_ERRORS = (*single.USER_ERRORS, BatchError)


def validate_config(config: ConfigDict):
  if not config.batch.features:
    raise labeling.ConfigValueError('Set the activation-records file: --config.features='
                                    'FILE.jsonl (records with a "feature_id" key).')
  if not config.batch.features_per_step >= 1:
    raise labeling.ConfigValueError(f'batch.features_per_step={config.batch.features_per_step} '
                                    'must be at least 1.')
  if config.label.num_tokens != 1:
    raise labeling.ConfigValueError('The batch job labels single tokens (label.num_tokens=1); '
                                    'label a feature with a longer label with tokenspace_jax.main.')
  probe = config.copy_and_resolve_references()
  probe.feature.records = config.batch.features  # the single-run checks, on the batch's file
  labeling.validate_config(probe)


@dataclasses.dataclass
class _Job:
  config: ConfigDict
  lm: LoadedModel
  workdir: str
  template: prompts.PromptTemplate
  allowed: np.ndarray
  optimizer: object
  step: object
  random_ids: list
  labels: LabelsFile
  stop: StopFlag
  scorer: scoring.LabelScorer | None = None


def run(config: ConfigDict, workdir: str, lm: LoadedModel | None = None) -> dict:
  """Labels the features of ``config.batch.features`` not yet in ``workdir``; returns counts."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  labeling._check_workdir_config(workdir, config)
  if lm is None:
    dtype = jnp.dtype(config.model.dtype)
    lm = load_model(config.model.source, dtype=dtype,
                    param_dtype=jnp.dtype(config.model.param_dtype or config.model.dtype))
    log.info('Loaded %s in %.1f s.', lm.path, lm.load_seconds)
  f = config.feature
  grouped = read_grouped_records(config.batch.features, lm.tokenizer, threshold=f.threshold,
                                 reference_word=f.reference_word,
                                 heldout_fraction=f.heldout_fraction, seed=f.split_seed)
  _write_skipped(os.path.join(workdir, 'skipped.jsonl'), grouped.problems)
  for p in grouped.problems:
    log.warning('Skipped: %s', p.error)
  size = config.batch.features_per_step
  groups = [(grouped.feature_ids[i:i + size], grouped.features[i:i + size])
            for i in range(0, len(grouped.features), size)]
  labels = LabelsFile(os.path.join(workdir, 'labels.jsonl'))
  log.info('%d features in %d groups of up to %d (%d already labeled); %d problems reported in '
           'skipped.jsonl.', len(grouped.features), len(groups), size,
           sum(fid in labels for fid in grouped.feature_ids), len(grouped.problems))
  allowed = (label_lib.allowed_tokens(lm.tokenizer, lm.config.vocab_size)
             if config.label.mask_special else np.ones(lm.config.vocab_size, bool))
  optimizer = descent.make_optimizer(config.optim)
  try:
    with StopFlag().installed() as stop:
      job = _Job(config=config, lm=lm, workdir=workdir,
                 template=prompts.template_from_config(config.prompt), allowed=allowed,
                 optimizer=optimizer,
                 step=make_stacked_step(labeling.make_objective(config, lm), optimizer),
                 random_ids=scoring.random_label_tokens(allowed, lm.tokenizer,
                                                         config.eval.num_random, config.seed),
                 labels=labels, stop=stop)
      for index, (ids, features) in enumerate(groups):
        _run_group(job, index, len(groups), ids, features)
  finally:
    labels.close()
  return {'features': len(grouped.features), 'labeled': labels.lines,
          'skipped': len(grouped.problems), 'groups': len(groups)}


def _write_skipped(path: str, problems):
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for p in problems:
      f.write(json.dumps(p.as_dict(), ensure_ascii=False) + '\n')
  os.replace(tmp, path)


def _interrupted(stop: StopFlag, what: str) -> labeling.RunInterrupted:
  return labeling.RunInterrupted(f'{stop.signal_name} received: stopped {what}. Rerun the same '
                                 'command to resume.')


def _run_group(job: _Job, index: int, count: int, ids: list, features: list):
  name = f'{index:05d}'
  directory = os.path.join(job.workdir, 'groups', name)
  if all(fid in job.labels for fid in ids):
    shutil.rmtree(directory, ignore_errors=True)  # a kill right before the clean-up
    return
  if job.stop:
    raise _interrupted(job.stop, f'before group {name}')
  os.makedirs(directory, exist_ok=True)
  members = os.path.join(directory, 'features.json')
  if os.path.exists(members):
    with open(members) as f:
      before = json.load(f)
    if before != ids:
      raise BatchError(f'{directory} was started on features {before} but the records file now '
                       f'puts {ids} in group {index}: the file changed since. Use a new '
                       '--workdir, or restore the file.')
  else:
    with open(members, 'w') as f:
      json.dump(ids, f)
  start = time.perf_counter()
  group = feature_group.prepare_group(job.config, job.lm, job.template, job.allowed, ids,
                                      features)
  prep_seconds = time.perf_counter() - start
  state = _initial_state(job, group)
  ckpt = Checkpointer(os.path.join(directory, 'checkpoints'), job.config.checkpoint_every)
  try:
    restored = ckpt.restore(state)
    if restored is not None:
      state = restored
      log.info('Group %s: resumed from the checkpoint at step %d.', name, int(state['t']))
    start = time.perf_counter()
    t0 = int(state['t'])
    state = _descend(job, group, state, ckpt, f'group {name}')
    descent_seconds = time.perf_counter() - start
  finally:
    ckpt.close()
  start = time.perf_counter()
  _write_lines(job, group, state)
  job.scorer.caches = None  # so this pool is freed before the next one is built
  shutil.rmtree(directory)
  log.info('Group %s (%d of %d: %s): prepared in %.1f s, steps %d-%d in %.1f s, evaluated in '
           '%.1f s.', name, index + 1, count, ', '.join(map(str, ids)), prep_seconds, t0,
           int(state['t']),
           descent_seconds, time.perf_counter() - start)


def _initial_state(job: _Job, group: feature_group.FeatureGroup) -> dict:
  cfg, lm = job.config, job.lm
  word_id = (label_lib.token_id_for_word(lm.tokenizer, cfg.label.init_word)
             if cfg.label.init == 'word' else None)
  labels = [label_lib.init_label(cfg.label, lm.config.vocab_size, jax.random.PRNGKey(cfg.seed),
                                 prior_logits=np.asarray(prior), word_id=word_id)
            for prior in group.data.mean_log_prior]
  rows = len(labels)
  return {'rows': init_stacked_state(stack(labels), job.optimizer),
          'status': jnp.full(rows, RUNNING, jnp.int32), 'above': jnp.zeros(rows, jnp.int32),
          'loss': jnp.zeros(rows, jnp.float32), 't': jnp.zeros((), jnp.int32)}


def _descend(job: _Job, group, state: dict, ckpt: Checkpointer, name: str) -> dict:
  """Steps until every row has stopped early, failed, or done ``config.steps`` steps."""
  from tqdm import tqdm

  cfg = job.config
  status, above, loss = (np.array(state[k]) for k in ('status', 'above', 'loss'))
  rows, t = state['rows'], int(state['t'])
  pack = lambda: {'rows': rows, 'status': jnp.asarray(status), 'above': jnp.asarray(above),
                  'loss': jnp.asarray(loss), 't': jnp.asarray(t, jnp.int32)}
  with tqdm(total=cfg.steps, initial=t, disable=not cfg.progress, desc=name,
            dynamic_ncols=True) as bar:
    while t < cfg.steps and (status == RUNNING).any():
      rows, metrics = job.step(rows, group.data, jnp.asarray(status == RUNNING))
      m = jax.device_get({k: metrics[k] for k in ('ok', 'loss', 'top_p')})
      for r in np.flatnonzero(status == RUNNING):
        loss[r] = m['loss'][r]
        if not m['ok'][r]:
          status[r] = NON_FINITE
          continue
        above[r] = above[r] + 1 if m['top_p'][r, 0] >= cfg.early_stop.prob else 0
        if cfg.early_stop.prob > 0 and above[r] >= cfg.early_stop.patience:
          status[r] = STOPPED_EARLY
      t += 1
      bar.update(1)
      ckpt.save(t, pack())
      if job.stop:
        ckpt.save(t, pack(), force=True)
        raise _interrupted(job.stop, f'{name} after step {t} with a checkpoint')
  state = pack()
  ckpt.save(t, state, force=True)  # the final state, for a kill while the lines are written
  return state


def _write_lines(job: _Job, group: feature_group.FeatureGroup, state: dict):
  if job.scorer is None:
    job.scorer = scoring.LabelScorer(job.lm.model, job.lm.params, group.data.caches,
                                      group.data.tail_ids, group.data.answer_ids,
                                      job.config.loss.answer == 'full', job.config.eval.batch_size)
  job.scorer.caches = group.data.caches  # the margins are jitted once, for every group's pool
  rows = jax.device_get(state['rows'])
  for r, fid in enumerate(group.feature_ids):
    if fid in job.labels:
      continue
    steps = int(rows['step'][r])
    if int(state['status'][r]) == NON_FINITE:
      line = {'feature_id': fid, 'steps': steps,
              'error': f'The loss became {float(state["loss"][r])} at step {steps + 1}; the '
                       'feature was skipped. Lower optim.lr, or check the model weights and '
                       'dtype.'}
    else:
      label = jax.tree.map(lambda x, r=r: x[r], rows['label'])
      line = group_eval.feature_line(job.config, job.lm.tokenizer, job.template, job.scorer,
                                     group, r, label, job.random_ids)
      line.update(steps=steps, stopped_early=int(state['status'][r]) == STOPPED_EARLY,
                  final_loss=float(state['loss'][r]))
    job.labels.append(line)
    if job.stop:
      raise _interrupted(job.stop, f'after writing the line of feature {fid!r}')


def main(argv):
  config = single.config_from_flags(argv, 'configs/batch.py')
  if config is None:
    return 2
  stem = os.path.splitext(os.path.basename(config.batch.features))[0]
  workdir = single._WORKDIR.value or os.path.join('workdirs', f'batch-{stem or "run"}')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  logging.getLogger('absl').setLevel(logging.WARNING)
  if not jax.config.jax_compilation_cache_dir:
    # A job restarted after a preemption loads its compiled steps instead of compiling them
    # again (minutes for a large model on a TPU). JAX_COMPILATION_CACHE_DIR picks another place.
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.join(workdir, 'compilation_cache')))
  log.info('Workdir %s, compilation cache %s\n%s', workdir, jax.config.jax_compilation_cache_dir,
           config)
  counts, code = single.run_reporting_errors(run, config, workdir,
                                             errors=USER_ERRORS)
  if code:
    return code
  print(f'{counts["labeled"]} of {counts["features"]} features labeled in '
        f'{os.path.join(workdir, "labels.jsonl")}; {counts["skipped"]} records or features '
        f'skipped (see skipped.jsonl).')
  return 0


if __name__ == '__main__':
  # The --config and --workdir flags are main's: importing it defines them.
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=single._parse_flags)
