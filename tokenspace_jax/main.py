"""Label one feature: ``python -m tokenspace_jax.main --config=configs/chinese.py [--workdir=DIR]``.

Overrides: ``--config.optim.lr=0.3``; config arguments: ``configs/animal.py:quick``. Rerunning
with the same workdir resumes from its latest checkpoint. One label row writes ``result.json``;
several (``sweep.restarts``, ``sweep.grid``) write ``sweep.json``. Only wiring lives here: the
work is the engine's (``engine.run.label_features``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from ml_collections import ConfigDict

from tokenspace_jax import cli, config_defaults
from tokenspace_jax.engine import loop, record
from tokenspace_jax.engine.run import (
  default_workdir,
  inputs_of,
  label_features,
  load_for,
  run_mesh,
  with_model,
)
from tokenspace_jax.features import SYNTHETIC_FEATURES
from tokenspace_jax.features.from_config import load_feature
from tokenspace_jax.models import LoadedModel, ModelLoadError
from tokenspace_jax.models.loading.load import resolve_source
from tokenspace_jax.outputs import report, views
from tokenspace_jax.outputs.checkpoint import StopFlag
from tokenspace_jax.outputs.workdir import Workdir, fingerprint_model
from tokenspace_jax.parallel import distributed

log = logging.getLogger('tokenspace_jax')


def is_sweep(config: ConfigDict) -> bool:
  return bool(config.sweep.grid) or config.sweep.restarts > 1


def run(config: ConfigDict, workdir: str, lm: LoadedModel | None = None,
        progress: bool | None = None) -> dict:
  """Labels the feature of ``config``; returns (and writes) ``result.json`` or ``sweep.json``."""
  config_defaults.validate(config, SYNTHETIC_FEATURES)
  name = 'sweep.json' if is_sweep(config) else 'result.json'
  main_process = distributed.is_main_process()
  wd = Workdir(workdir, write=main_process, resumable=config_defaults.RESUMABLE_CHANGES)
  with wd.lock():
    settings = json.loads(config.to_json())
    inputs = inputs_of(config)
    wd.check(settings, inputs)
    finished = wd.finished(name)
    if finished is not None:
      # The model too, without loading it: a result of another model is as stale as one of
      # another records file. A model that cannot be found here cannot be compared; the result
      # is still shown (a workdir copied elsewhere to be read).
      try:
        path = lm.path if lm is not None else resolve_source(config.model.source)
      except ModelLoadError:
        log.warning('Model %s not found here: the finished result is shown unchecked against '
                    'it.', config.model.source)
      else:
        wd.check(settings, {**inputs, 'model': fingerprint_model(config.model.source, path)})
      log.info('%s already holds a finished run; not recomputing.', wd.path(name))
      return finished
    wall_start = time.perf_counter()
    mesh = run_mesh(config)
    on_mesh = mesh.size > 1
    lm = lm or load_for(config, mesh)
    if on_mesh:
      log.info('Mesh %s over %d devices (%s).', dict(mesh.shape), mesh.size,
               mesh.devices.flat[0].platform)
    inputs = with_model(inputs, config, lm)
    wd.check(settings, inputs)
    feature = load_feature(config.feature, lm.tokenizer, lm.config.vocab_size)
    with StopFlag().installed() as stop:
      wd.commit(settings, inputs)  # the run has really started: its config is the workdir's
      show = (config.progress if progress is None else progress) and main_process
      labeled = label_features(config, lm, [feature], checkpoints=wd.path('checkpoints'),
                               stop=stop, mesh=mesh if on_mesh else None,
                               trajectory_path=wd.path('trajectory.jsonl'), write=main_process,
                               progress=show, name='')
    pool = labeled.pool
    log.info('Feature %s: %d train / %d held-out examples; caches (%.0f MB of keys and '
             'values) and priors in %.1f s.', feature.name, int(pool.train.sum()),
             int((~pool.train).sum()), pool.caches.kv_bytes / 1e6, pool.seconds)
    log.info('Descent: %d steps in %.1f s (first step, with compilation, %.1f s); scoring in '
             '%.1f s.', labeled.loop.steps_run, labeled.seconds['descent'],
             labeled.seconds['compile'] or 0.0, labeled.seconds['scoring'])
    records = labeled.records
    if all('error' in r for r in records):
      steps = max(r['steps'] for r in records)
      raise loop.NonFiniteLossError(
          f'The loss became non-finite at step {steps + 1}; stopped. The last good state (step '
          f'{steps}) is kept in {wd.path("checkpoints")}. Rerun with a lower optim.lr and a new '
          '--workdir (this one holds the failed run), or check the model weights and dtype '
          '(bfloat16 overflows more easily than float32).')
    last = labeled.trajectory[-1] if labeled.trajectory else {}
    descent_time = last.get('elapsed', 0.0)
    steps_done = max(r['steps'] for r in records)
    timings = {'wall_seconds': time.perf_counter() - wall_start,
               'descent_seconds': descent_time,
               'steps_per_second': steps_done / descent_time if descent_time else None,
               'compile_seconds': labeled.seconds['compile'],
               'phase_seconds': {'model': lm.load_seconds, **labeled.seconds}}
    if is_sweep(config):
      result = views.sweep_view(records, record.best_row(records), config=config,
                                model=lm.path, timings=timings)
    else:
      result = views.result_view(records[0], config=config, model=lm.path, timings=timings)
    if main_process:
      best = record.best_row(records)
      rows = [x for x in labeled.trajectory if x.get('row', 0) == best['row']]
      p = best['probability']
      report.plot_trajectory(rows, wd.path('trajectory.png'),
                             f'{feature.name}: {best["label"]!r}'
                             + (f' p={p:.2f}' if p is not None else ''))
      report.write_json(wd.path(name), result)
    return result


def main(argv):
  config = cli.config_from_flags(argv, 'configs/chinese.py')
  if config is None:
    return 2
  try:  # before any folder is made: the workdir's name comes from the config
    config_defaults.validate(config, SYNTHETIC_FEATURES)
    workdir = cli.WORKDIR.value or default_workdir(config)
  except config_defaults.ConfigValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  logging.getLogger('absl').setLevel(logging.WARNING)
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  finished = os.path.exists(os.path.join(workdir, 'sweep.json' if is_sweep(config)
                                         else 'result.json'))  # what run() will only read
  cache = None if finished else cli.use_compilation_cache(workdir)
  log.info('Config %s, overrides %s, workdir %s, compilation cache %s\n%s',
           cli.config_filename(), overrides, workdir, cache, config)
  # Before anything touches a device: joins the other hosts of a pod slice (auto-detected on
  # Cloud TPU, or from JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID); a no-op on a
  # single machine.
  result, code = cli.run_reporting_errors(lambda: (distributed.initialize(),
                                                   run(config, workdir))[1])
  if code or not distributed.is_main_process():
    return code
  if is_sweep(config):
    print(views.sweep_summary(result))
    print(f'{"Read" if finished else "Wrote"} {os.path.join(workdir, "sweep.json")}')
  else:
    print(views.summary(result))
    print(f'Read {os.path.join(workdir, "result.json")} (a finished run, not recomputed)'
          if finished else f'Wrote {os.path.join(workdir, "result.json")} and trajectory.png')
  return 0


if __name__ == '__main__':
  cli.start(main)
