"""Label every feature of an activation-records file, several features per descent step.

    python -m tokenspace_jax.batch --config=configs/batch.py --config.features=FILE.jsonl \\
        --workdir=DIR

Records carry a ``feature_id`` (see ``features.grouped_records``). Features, in the order their
ids first appear, form groups of ``batch.features_per_step``; a group's rows are descended
together by the engine, one step for all, over one pool of prefix caches. What DIR holds:

* ``labels.jsonl``: one line per finished feature (its best row, by training AUROC), written
  (flushed and fsynced) as its group finishes: the label, its probability and top 5, held-out
  AUROCs of the found, reference and random labels with intervals, window-level detection and
  correlation scores, the verdict and the number of steps. A feature whose loss became NaN or
  infinite in every row gets a line with an ``error`` field instead, and is not retried.
* ``skipped.jsonl``: what was not labeled, rewritten at every start: malformed records (with
  their line number) and features that cannot be learned, one JSON object each with an
  ``error`` message.
* ``groups/NNNNN/``: the checkpoints of the group in progress, removed once all its lines are
  written; ``config.json`` and ``inputs.json``: the config and the inputs' fingerprints,
  checked on restart; ``features.json``: the features this worker labels, in order.

Killed at any point (SIGTERM, as a preemption does, or SIGKILL) and rerun with the same command,
the job skips the features already in labels.jsonl, resumes the unfinished group from its
checkpoint, and writes only the lines still missing, so the final labels.jsonl equals an
uninterrupted run's.

Many machines: ``--config.batch.shard=i --config.batch.num_shards=n`` makes worker ``i`` label
features ``i, i + n, i + 2n, ...`` of the file into its own workdir; ``python -m
tokenspace_jax.outputs.merge`` joins the workers' labels files into one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

import jax
from ml_collections import ConfigDict

from tokenspace_jax import cli, config_defaults
from tokenspace_jax.engine import record
from tokenspace_jax.engine.run import label_features, load_for, run_mesh, with_model
from tokenspace_jax.features.grouped_records import read_grouped_records
from tokenspace_jax.models import LoadedModel
from tokenspace_jax.outputs import storage, views
from tokenspace_jax.outputs.checkpoint import StopFlag
from tokenspace_jax.outputs.labels_file import LabelsFile
from tokenspace_jax.outputs.workdir import Workdir, WorkdirError, fingerprint_file
from tokenspace_jax.parallel import distributed, sharding

log = logging.getLogger('tokenspace_jax')


class BatchError(WorkdirError):
  """A workdir that does not match the records file; the message says what to do."""


def validate(config: ConfigDict):
  b = config.batch
  if not b.features:
    raise config_defaults.ConfigValueError('Set the activation-records file: --config.features='
                                           'FILE.jsonl (records with a "feature_id" key).')
  if not b.features_per_step >= 1:
    raise config_defaults.ConfigValueError(
        f'batch.features_per_step={b.features_per_step} must be at least 1.')
  if not (b.num_shards >= 1 and 0 <= b.shard < b.num_shards):
    raise config_defaults.ConfigValueError(
        f'batch.shard={b.shard} must be in [0, batch.num_shards={b.num_shards}).')
  probe = config.copy_and_resolve_references()
  probe.feature.records = b.features  # the single-run checks, on the batch's file
  config_defaults.validate(probe)


def pool_slots(config: ConfigDict, shards: int) -> int:
  """Slots per data shard of a full group's pool, fixed when both splits are capped, so every
  group has the step's shapes; 0 (as large as the group needs) otherwise."""
  f, size = config.feature, config.batch.features_per_step
  if f.max_train <= 0 or f.max_heldout <= 0:
    return 0
  # Each of a group's 3 strata per feature is dealt round robin: at most one extra per shard.
  return -(-size * (f.max_train + f.max_heldout) // shards) + 3 * size


def run(config: ConfigDict, workdir: str, lm: LoadedModel | None = None) -> dict:
  """Labels the features of ``config.batch.features`` not yet in ``workdir``; returns counts."""
  validate(config)
  main_process = distributed.is_main_process()
  wd = Workdir(workdir, write=main_process, resumable=config_defaults.RESUMABLE_CHANGES)
  with wd.lock():
    settings = json.loads(config.to_json())
    inputs = {'batch.features': fingerprint_file(config.batch.features)}
    wd.check(settings, inputs)
    mesh = run_mesh(config)
    lm = lm or load_for(config, mesh)
    inputs = with_model(inputs, config, lm)
    wd.check(settings, inputs)
    f = config.feature
    grouped = read_grouped_records(config.batch.features, lm.tokenizer, threshold=f.threshold,
                                   reference_word=f.reference_word,
                                   heldout_fraction=f.heldout_fraction, seed=f.split_seed,
                                   window=f.window, vocab_size=lm.config.vocab_size)
    b = config.batch
    ids = grouped.feature_ids[b.shard::b.num_shards]
    features = grouped.features[b.shard::b.num_shards]
    wd.commit(settings, inputs)
    if main_process:
      _write_unless_same(wd.path('skipped.jsonl'), ''.join(
          json.dumps(p.as_dict(), ensure_ascii=False) + '\n' for p in grouped.problems))
      # What this worker owes, in order: what the merge of several workers checks against.
      _write_unless_same(wd.path('features.json'), json.dumps(
          {'shard': b.shard, 'num_shards': b.num_shards, 'total': len(grouped.feature_ids),
           'feature_ids': ids}, indent=2, ensure_ascii=False))
    for p in grouped.problems:
      log.warning('Skipped: %s', p.error)
    size = b.features_per_step
    groups = [(ids[i:i + size], features[i:i + size]) for i in range(0, len(features), size)]
    labels = LabelsFile(wd.path('labels.jsonl')) if main_process else None
    done = (lambda fid: fid in labels) if labels is not None else (lambda fid: False)
    if labels is not None and not all(map(done, ids)):
      storage.check_writable(wd.root)  # a finished job is only read; one with work must write
    log.info('%d features%s in %d groups of up to %d (%d already labeled); %d problems reported '
             'in skipped.jsonl.', len(features),
             f' (shard {b.shard} of {b.num_shards})' if b.num_shards > 1 else '', len(groups),
             size, sum(done(fid) for fid in ids), len(grouped.problems))
    on_mesh = mesh.size > 1
    shards = mesh.shape[sharding.DATA] if on_mesh else 1
    try:
      with StopFlag().installed() as stop:
        for index, (group_ids, group) in enumerate(groups):
          _run_group(config, lm, wd, index, len(groups), group_ids, group, labels, done, stop,
                     mesh if on_mesh else None, pool_slots(config, shards))
    finally:
      if labels is not None:
        labels.close()
  return {'features': len(features), 'labeled': labels.lines if labels else 0,
          'skipped': len(grouped.problems), 'groups': len(groups)}


def _write_unless_same(path: str, text: str):
  """Replaces ``path`` with ``text`` unless it holds that already: a finished job on a
  read-only workdir is shown, not refused."""
  try:
    with open(path, encoding='utf-8') as f:
      if f.read() == text:
        return
  except (OSError, UnicodeDecodeError):
    pass
  storage.atomic_write_text(path, text)


def _interrupted(stop: StopFlag, what: str):
  from tokenspace_jax.engine.loop import RunInterrupted
  return RunInterrupted(f'{stop.signal_name} received: stopped {what}. Rerun the same command to '
                        'resume.')


def _run_group(config, lm, wd, index, count, ids, features, labels, done, stop, mesh, n_local):
  name = f'{index:05d}'
  directory = wd.path(os.path.join('groups', name))
  if all(done(fid) for fid in ids):
    if labels is not None:
      shutil.rmtree(directory, ignore_errors=True)  # a kill right before the clean-up
    return
  if stop:
    raise _interrupted(stop, f'before group {name}')
  members = os.path.join(directory, 'features.json')
  if os.path.exists(members):
    with open(members) as f:
      before = json.load(f)
    if before != ids:
      raise BatchError(f'{directory} was started on features {before} but the records file now '
                       f'puts {ids} in group {index}: the file changed since. Use a new '
                       '--workdir, or restore the file.')
  elif labels is not None:
    os.makedirs(directory, exist_ok=True)
    storage.write_json(members, ids)
  start = time.perf_counter()
  labeled = label_features(config, lm, features, checkpoints=os.path.join(directory,
                                                                          'checkpoints'),
                           stop=stop, mesh=mesh, write=labels is not None,
                           progress=config.progress, name=f'group {name}', n_local=n_local)
  if labels is not None:
    for f, fid in enumerate(ids):
      if done(fid):
        continue
      rows = [r for r, spec in zip(labeled.records, labeled.specs, strict=True)
              if spec.feature == f]
      labels.append(views.labels_line(record.best_row(rows), fid,
                                      features[f].meta.get('source')))
      if stop:
        raise _interrupted(stop, f'after writing the line of feature {fid!r}')
    shutil.rmtree(directory)
  jax.block_until_ready(labeled.pool.caches)
  log.info('Group %s (%d of %d: %s): prepared in %.1f s (%.0f MB of cached keys and values), '
           'steps %s in %.1f s, scored in %.1f s (%.1f s in all).', name, index + 1, count,
           ', '.join(map(str, ids)), labeled.seconds['pool'],
           labeled.pool.caches.kv_bytes / 1e6,
           f'{labeled.resumed_at or 0}-{int(labeled.loop.state["t"])}',
           labeled.seconds['descent'], labeled.seconds['scoring'], time.perf_counter() - start)


def main(argv):
  config = cli.config_from_flags(argv, 'configs/batch.py')
  if config is None:
    return 2
  try:
    validate(config)
  except config_defaults.ConfigValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  stem = os.path.splitext(os.path.basename(config.batch.features))[0]
  b = config.batch
  suffix = f'-shard{b.shard}of{b.num_shards}' if b.num_shards > 1 else ''
  workdir = cli.WORKDIR.value or os.path.join('workdirs', f'batch-{stem or "run"}{suffix}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  log.info('Workdir %s, compilation cache %s\n%s', workdir, cli.use_compilation_cache(workdir),
           config)
  counts, code = cli.run_reporting_errors(lambda: (distributed.initialize(),
                                                   run(config, workdir))[1])
  if code or not distributed.is_main_process():
    return code
  print(f'{counts["labeled"]} of {counts["features"]} features labeled in '
        f'{os.path.join(workdir, "labels.jsonl")}; {counts["skipped"]} records or features '
        f'skipped (see skipped.jsonl).')
  return 0


if __name__ == '__main__':
  cli.start(main)
