"""The batch job: the rows step against single steps, and kills, restarts and bad records.

The job tests use a tiny random Llama over SmolLM2's vocabulary with the real tokenizer (as
test_main does), so labels are meaningless but every file the job writes is real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from tokenspace_jax import batch, config_defaults
from tokenspace_jax.classifier import prefix
from tokenspace_jax.classifier.objective import LossWeights, Objective
from tokenspace_jax.engine import descent, rows
from tokenspace_jax.features.synthetic_records import synthetic_records
from tokenspace_jax.models import Llama, LlamaConfig, load_model
from tokenspace_jax.outputs.workdir import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = ('animal', 'number', 'mammal', 'chinese')

# --- the rows step ---------------------------------------------------------------------------

TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False)


def _pool(n=16, width=10, shared=3):
  """A tiny model and a pool of random prefix caches: made, not computed, so nothing compiles
  but the steps under test."""
  model = Llama(TINY)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  rng = np.random.default_rng(0)
  # Weights larger than the usual init, so that the label visibly changes the answer.
  random = lambda path, s: jnp.asarray(
      rng.normal(1.0 if 'scale' in jax.tree_util.keystr(path) else 0.0, 0.2, s.shape), s.dtype)
  params = jax.tree_util.tree_map_with_path(random, shapes['params'])
  kv = (TINY.num_layers, n * width, TINY.num_kv_heads, TINY.head_dim)  # packed, W apart
  shared_kv = (TINY.num_layers, shared, TINY.num_kv_heads, TINY.head_dim)
  valid = np.ones((n, width), bool)
  for i in range(n):
    valid[i, :rng.integers(0, 4)] = False
  caches = prefix.PrefixCaches(
      k=jnp.asarray(rng.normal(size=kv), jnp.float32), v=jnp.asarray(rng.normal(size=kv),
                                                                     jnp.float32),
      valid=jnp.asarray(valid), start=jnp.arange(n, dtype=jnp.int32) * width,
      log_prior=jax.nn.log_softmax(jnp.asarray(rng.normal(size=(n, TINY.vocab_size)),
                                               jnp.float32)),
      shared_k=jnp.asarray(rng.normal(size=shared_kv), jnp.float32),
      shared_v=jnp.asarray(rng.normal(size=shared_kv), jnp.float32))
  return model, params, caches


def test_rows_step_equals_separate_steps():
  """Each row of the engine's step is the single-label step: same loss and label after several
  steps (so the Adam moments and the gradient clipping are per row), and a row whose loss is
  NaN, or that is inactive, stays as it was without disturbing the others."""
  model, params, caches = _pool()
  n, steps = 3, 3
  rng = np.random.default_rng(1)
  schedules = rng.integers(0, 16, (n, steps, 6)).astype(np.int32)
  priors = jnp.stack([caches.log_prior[4 * r:4 * r + 4].mean(0) for r in range(n)])
  data = descent.DescentData(
      params=params, caches=caches, targets=jnp.asarray(rng.integers(0, 2, 16), jnp.float32),
      schedule=jnp.asarray(schedules), tail_ids=jnp.asarray([7, 8, 9], jnp.int32),
      answer_ids=jnp.asarray([3, 4], jnp.int32),
      allowed=jnp.ones(TINY.vocab_size, bool).at[:5].set(False), mean_log_prior=priors)
  objective = Objective(model, LossWeights(1.0, 0.1, 2, 0.05))
  optimizer = descent.make_optimizer(ConfigDict(dict(name='adam', lr=0.1, b1=0.9, b2=0.999,
                                                     clip_norm=0.5)))
  labels = [{'logits': jnp.asarray(rng.normal(size=(1, TINY.vocab_size)), jnp.float32),
             'answer_bias': jnp.asarray(0.1 * r, jnp.float32)} for r in range(n)]

  single = descent.make_step(objective, optimizer)
  expected = []
  for r in range(n):
    state = descent.init_state(jax.tree.map(jnp.array, labels[r]), optimizer)
    row_data = data.replace(schedule=data.schedule[r], mean_log_prior=priors[r])
    for _ in range(steps):
      state, metrics = single(state, row_data)
    expected.append((float(metrics['loss']), np.asarray(state['label']['logits'])))

  step = rows.make_rows_step(objective, optimizer, 0.1)
  chained = optax.chain(optimizer, optax.scale(1.0))
  state = jax.vmap(lambda label: descent.init_state(label, chained))(
      jax.tree.map(lambda *xs: jnp.stack(xs), *labels))
  hp = {'lr': jnp.full(n, 0.1), 'w_label': jnp.ones(n), 'w_entropy': jnp.full(n, 0.1),
        'w_kl': jnp.full(n, 0.05)}
  active = jnp.ones(n, bool)
  for _ in range(steps):
    state, metrics = step(state, data, hp, active)
  assert step._cache_size() == 1
  for r in range(n):
    np.testing.assert_allclose(float(metrics['loss'][r]), expected[r][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state['label']['logits'][r], expected[r][1], rtol=1e-5, atol=1e-5)
  assert np.asarray(state['step']).tolist() == [steps] * n

  # Row 0 turns NaN and row 2 is inactive: both stay put, row 1 moves on.
  before = jax.tree.map(np.array, state)
  state['label']['logits'] = state['label']['logits'].at[0, 0, 7].set(jnp.nan)
  state, metrics = step(state, data, hp, jnp.asarray([True, True, False]))
  assert np.asarray(metrics['ok']).tolist() == [False, True, True]
  assert np.asarray(state['step']).tolist() == [steps, steps + 1, steps]
  row = lambda tree, r: jax.tree.map(lambda x: np.asarray(x)[r], tree)
  jax.tree.map(np.testing.assert_array_equal, row(state, 2), row(before, 2))
  assert not np.array_equal(state['label']['logits'][1], before['label']['logits'][1])


# --- the job ---------------------------------------------------------------------------------

OVERRIDES = {'steps': 6, 'checkpoint_every': 2, 'early_stop.prob': 0.0, 'feature.max_train': 16,
             'feature.max_heldout': 12, 'eval.calibration_examples': 8, 'eval.num_random': 2,
             'batch.features_per_step': 2}


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """Four features' records, interleaved, with one malformed line of each kind and a feature
  that never fires; returns (path, line numbers of the bad lines)."""
  rows = [synthetic_records(name)[:20] for name in FEATURES]
  lines = [json.dumps(r, ensure_ascii=False) for group in zip(*rows, strict=True) for r in group]
  bad = ['{"feature_id": "animal", "tokens": ["a"', json.dumps({'feature_id': 'animal',
                                                               'tokens': ['A', ' cat']}),
         json.dumps({'feature_id': 'number', 'tokens': ['1', ' 2'], 'activations': [1.0]}),
         json.dumps({'tokens': ['A', ' dog'], 'activations': [0.0, 1.0]})]
  bad_lines = []
  for i, line in enumerate(bad):
    at = 7 + 11 * i
    lines.insert(at, line)
    bad_lines.append(at + 1)
  flat = json.dumps({'feature_id': 99, 'tokens': ['The', ' sky'], 'activations': [0.0, 0.0]})
  lines += [flat, flat]
  path = tmp_path_factory.mktemp('records') / 'features.jsonl'
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(path), bad_lines


def _config(source, features, **changes):
  spec = importlib.util.spec_from_file_location('batch_config', os.path.join(ROOT, 'configs',
                                                                             'batch.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  return config_defaults.override(c, {**OVERRIDES, 'model.source': source,
                                      'features': features, **changes})


def _command(workdir, source, features):
  return [sys.executable, '-m', 'tokenspace_jax.batch', '--config=configs/batch.py',
          f'--config.features={features}', f'--workdir={workdir}',
          f'--config.model.source={source}',
          *(f'--config.{k}={v}' for k, v in OVERRIDES.items())]


@pytest.fixture(scope='module')
def env():
  """For the job's subprocesses. They compile into the test run's compilation cache (set by
  conftest.py, shared by both workers), so only the first run of a program compiles it."""
  assert os.environ.get('JAX_COMPILATION_CACHE_DIR'), 'conftest.py sets the shared cache'
  return {**os.environ, 'PYTHONUNBUFFERED': '1'}


@pytest.fixture(scope='module')
def straight(tiny_folder, records, env, tmp_path_factory):
  """The workdir of an uninterrupted run of the command."""
  workdir = tmp_path_factory.mktemp('straight')
  proc = subprocess.run(_command(workdir, tiny_folder, records[0]), cwd=ROOT, env=env,
                        capture_output=True, timeout=600)
  assert proc.returncode == 0, proc.stderr.decode()[-3000:]
  return str(workdir)


@pytest.fixture(scope='module')
def tiny_lm(tiny_folder):
  return load_model(tiny_folder)


def _lines(workdir, name='labels.jsonl'):
  with open(os.path.join(workdir, name), encoding='utf-8') as f:
    return [json.loads(x) for x in f]


def test_malformed_records_are_reported_and_skipped(straight, records):
  workdir = straight
  labels = _lines(workdir)
  assert [r['feature_id'] for r in labels] == list(FEATURES)
  for r in labels:
    assert 0 <= r['auroc']['found'] <= 1 and 0 <= r['auroc']['reference'] <= 1
    assert r['steps'] == OVERRIDES['steps'] and len(r['top5']) == 5 and 'error' not in r
    assert r['descent_label'] == r['top5'][0]['token']
    assert r['auroc']['found_interval'][0] <= r['auroc']['found'] <= r['auroc']['found_interval'][1]
  skipped = _lines(workdir, 'skipped.jsonl')
  assert [s.get('line') for s in skipped if 'line' in s] == records[1]
  for s in skipped:
    if 'line' in s:
      assert f'line {s["line"]}:' in s['error']
  assert [s['feature_id'] for s in skipped if 'feature_id' in s] == [99]
  assert 'no positive' in skipped[-1]['error']
  assert not os.listdir(os.path.join(workdir, 'groups'))  # finished groups leave nothing


def test_sigterm_then_resume_equals_uninterrupted_run(straight, tiny_folder, records, env,
                                                      tmp_path):
  """Killed in the second group, then restarted: the same labels.jsonl as an uninterrupted run.

  Before the restart the first group's last line is also cut short, as a kill that cannot be
  caught (SIGKILL) would leave it mid-write: the restart drops the stub, writes that line once
  (and not the whole line before it again), and resumes the second group from its checkpoint.
  """
  killed = tmp_path / 'killed'
  cmd = _command(killed, tiny_folder, records[0])
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  labels, second = killed / 'labels.jsonl', killed / 'groups' / '00001'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if second.exists():  # the first group's lines are written; the second group is starting
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err.decode()[-3000:]
  assert b'Rerun the same command to resume' in err
  assert [r['feature_id'] for r in _lines(killed)] == list(FEATURES[:2])
  assert os.listdir(second / 'checkpoints')  # stopped mid-descent, with a checkpoint

  lines = labels.read_bytes().splitlines(keepends=True)
  labels.write_bytes(lines[0] + lines[1][:40])
  resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
  assert b'cut short' in resumed.stderr
  assert b'group 00001: Resumed from the checkpoint at step' in resumed.stderr
  assert labels.read_bytes() == open(os.path.join(straight, 'labels.jsonl'), 'rb').read()
  assert (killed / 'skipped.jsonl').read_bytes() == open(
      os.path.join(straight, 'skipped.jsonl'), 'rb').read()
  assert not os.listdir(killed / 'groups')


def test_workdir_of_another_config_is_refused(straight, tiny_folder, records, tiny_lm):
  labels = os.path.join(straight, 'labels.jsonl')
  before = open(labels, 'rb').read()
  with pytest.raises(WorkdirError, match='optim'):
    batch.run(_config(tiny_folder, records[0], **{'optim.lr': 0.5}), straight)
  with pytest.raises(WorkdirError, match='batch'):
    batch.run(_config(tiny_folder, records[0], **{'batch.features_per_step': 3}), straight)
  # The command's own config is accepted, and a finished job is not recomputed.
  counts = batch.run(_config(tiny_folder, records[0]), straight, lm=tiny_lm)
  assert counts['labeled'] == len(FEATURES)
  assert open(labels, 'rb').read() == before


def test_group_of_other_features_is_refused(straight, tiny_folder, records, tiny_lm, tmp_path):
  """A records file edited between a kill and the restart: the group on disk no longer matches."""
  workdir = tmp_path / 'edited'
  shutil.copytree(straight, workdir)
  lines = (workdir / 'labels.jsonl').read_bytes().splitlines(keepends=True)
  (workdir / 'labels.jsonl').write_bytes(b''.join(lines[:2]))
  (workdir / 'groups' / '00001').mkdir(parents=True)
  (workdir / 'groups' / '00001' / 'features.json').write_text(json.dumps(['mammal', 'cat']))
  with pytest.raises(batch.BatchError, match='changed'):
    batch.run(_config(tiny_folder, records[0]), str(workdir), lm=tiny_lm)


def test_worker_shards_merged_equal_one_job(straight, tiny_folder, records, tiny_lm, tmp_path):
  """Two workers each label every other feature into their own workdir; the merge gives the
  uninterrupted job's features, each once, in the file's order, with the same labels."""
  from tokenspace_jax.outputs import merge

  workers = [str(tmp_path / f'shard{i}') for i in range(2)]
  for i, workdir in enumerate(workers):
    batch.run(_config(tiny_folder, records[0], **{'batch.shard': i, 'batch.num_shards': 2,
                                                   'batch.features_per_step': 1}),
              workdir, lm=tiny_lm)
  assert [x['feature_id'] for x in _lines(workers[0])] == ['animal', 'mammal']
  with pytest.raises(merge.MergeError, match='missing'):
    merge.merge(workers[:1])
  out = tmp_path / 'merged.jsonl'
  assert merge.main([*workers[::-1], f'--out={out}']) == 0
  merged = [json.loads(x) for x in out.read_text().splitlines()]
  one = _lines(straight)
  assert [x['feature_id'] for x in merged] == [x['feature_id'] for x in one] == list(FEATURES)
  for a, b in zip(merged, one, strict=True):
    assert (a['label'], a['descent_label']) == (b['label'], b['descent_label'])
    assert a['auroc']['found'] == pytest.approx(b['auroc']['found'], abs=1e-3)
  # A worker that has not finished is named, unless a partial merge is asked for.
  cut = tmp_path / 'cut'
  shutil.copytree(workers[1], cut)
  (cut / 'labels.jsonl').write_text(_lines_text(workers[1])[0])
  with pytest.raises(merge.MergeError, match=r'Shards \[1\]'):
    merge.merge([workers[0], str(cut)])
  assert len(merge.merge([workers[0], str(cut)], partial=True)) == 3


def _lines_text(workdir):
  with open(os.path.join(workdir, 'labels.jsonl'), encoding='utf-8') as f:
    return f.read().splitlines(keepends=True)


def test_prior_start_gives_each_row_its_own_features_prior():
  """label.init=prior: every row of a multi-feature step starts at its own feature's mean log
  prior (a restart adds its noise on top), so one feature's guess never seeds another's."""
  c = config_defaults.override(config_defaults.get_base_config(),
                               {'label.init': 'prior', 'sweep.restarts': 2, 'sweep.noise': 0.5})
  priors = np.log(np.random.default_rng(0).dirichlet(np.ones(7), size=3)).astype(np.float32)
  specs = rows.row_specs(c, 3)
  state = rows.init_rows(c, specs, priors, 7, None, optax.adam(0.1))
  logits = np.asarray(state['label']['logits'])  # [rows, K, V]
  assert [s.feature for s in specs] == [0, 0, 1, 1, 2, 2]
  for r, spec in enumerate(specs):
    if spec.restart == 0:
      np.testing.assert_allclose(logits[r, 0], priors[spec.feature], rtol=0, atol=0)
    else:  # the noise is around the same feature's prior, not another's
      assert np.abs(logits[r, 0] - priors[spec.feature]).max() > 0
      assert (np.abs(logits[r, 0] - priors[spec.feature]).mean()
              < min(np.abs(logits[r, 0] - priors[g]).mean() for g in range(3) if g != spec.feature))
