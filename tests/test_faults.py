"""Fault injection: ``main`` and ``batch`` SIGKILLed at random points, rerun until they finish,
end with the files of an uninterrupted run.

A kill that cannot be caught may land anywhere: during start-up, the prefix caches, a step, a
checkpoint save, the scoring, or while a result line is written. Whatever was lost is recomputed
from the last checkpoint, and descent is deterministic, so the final files must be those of a run
never interrupted (less the wall-clock timings). The ``main`` run stops early, so a kill after the
early stop must not run another step. Slow (minutes): run with ``-m slow``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tokenspace_jax.features.synthetic_records import synthetic_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ('wall_seconds', 'descent_seconds', 'steps_per_second', 'compile_seconds',
           'phase_seconds')
KILLS = 5

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return {**os.environ, 'PYTHONUNBUFFERED': '1',
          'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache'))}


def _kill_until_done(cmd, env, duration: float, seed: int) -> int:
  """Runs ``cmd``, SIGKILLing it at random moments of a run's ``duration`` (start-up included)
  until ``KILLS`` kills have landed, then lets it finish; returns how many landed."""
  rng = np.random.default_rng(seed)
  landed = attempts = 0
  while landed < KILLS and attempts < 4 * KILLS:
    attempts += 1
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Within the first half of an uninterrupted run's time: a resumed run still has its start-up
    # (about half of it on the tiny model) and the rest of its work ahead of it.
    time.sleep(float(rng.uniform(0.1, 0.5)) * duration)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      landed += 1
    proc.wait()
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=900)
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  return landed


def _timed(cmd, env) -> float:
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=900)
  assert proc.returncode == 0, proc.stderr.decode()[-3000:]
  return time.perf_counter() - start


def _result(workdir) -> dict:
  r = json.loads((workdir / 'result.json').read_text())
  return {k: v for k, v in r.items() if k not in TIMINGS}


def _trajectory(workdir) -> list:
  lines = [json.loads(x) for x in (workdir / 'trajectory.jsonl').read_text().splitlines()]
  return [{k: v for k, v in x.items() if k != 'elapsed'} for x in lines]


def test_main_killed_at_random_points_ends_as_an_uninterrupted_run(tiny_folder, tmp_path, env):
  cmd = lambda workdir: [
      sys.executable, '-m', 'tokenspace_jax.main', '--config=configs/animal.py:quick',
      f'--workdir={workdir}', f'--config.model.source={tiny_folder}', '--config.steps=30',
      '--config.checkpoint_every=3', '--config.progress=False',
      # Every step counts as confident: the run stops early, at step 8.
      '--config.early_stop.prob=1e-9', '--config.early_stop.patience=8']
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  duration = _timed(cmd(straight), env)
  assert json.loads((straight / 'result.json').read_text())['steps'] == 8
  landed = _kill_until_done(cmd(killed), env, duration, seed=0)
  assert landed == KILLS
  assert _result(killed) == _result(straight)
  assert _trajectory(killed) == _trajectory(straight)


def test_batch_killed_at_random_points_ends_as_an_uninterrupted_run(tiny_folder, tmp_path, env):
  rows = [synthetic_records(name)[:16] for name in ('animal', 'number', 'chinese')]
  records = tmp_path / 'features.jsonl'
  records.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n'
                             for group in zip(*rows, strict=True) for r in group),
                     encoding='utf-8')
  cmd = lambda workdir: [
      sys.executable, '-m', 'tokenspace_jax.batch', '--config=configs/batch.py:quick',
      f'--config.features={records}', f'--workdir={workdir}',
      f'--config.model.source={tiny_folder}', '--config.steps=6', '--config.checkpoint_every=2',
      '--config.early_stop.prob=0', '--config.batch.features_per_step=2',
      '--config.feature.max_train=16', '--config.feature.max_heldout=12']
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  duration = _timed(cmd(straight), env)
  landed = _kill_until_done(cmd(killed), env, duration, seed=1)
  assert landed == KILLS
  for name in ('labels.jsonl', 'skipped.jsonl'):
    assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
  assert not os.listdir(killed / 'groups')
