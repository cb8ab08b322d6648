"""The labeling run end to end, on a tiny random Llama that uses SmolLM2's real tokenizer.

The tiny model makes the labels meaningless but the machinery real: prompts built with the chat
template, caches, the jitted step, checkpoints, evaluation, the report, and the command line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tokenspace_jax import config_defaults, main
from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.config_defaults import ConfigValueError
from tokenspace_jax.engine.loop import NonFiniteLossError
from tokenspace_jax.features import FeatureError
from tokenspace_jax.models import load_model
from tokenspace_jax.outputs import views
from tokenspace_jax.outputs.checkpoint import Checkpointer
from tokenspace_jax.outputs.workdir import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny_lm(tiny_folder):
  return load_model(tiny_folder)


def quick_config(feature='animal', **changes):
  c = config_defaults.apply_arg(config_defaults.get_base_config(), 'quick')
  c.feature.name = feature
  c.steps = 12
  c.checkpoint_every = 4
  c.early_stop.prob = 0.0
  c.progress = False
  return config_defaults.override(c, changes)


def test_run_writes_a_complete_result(tiny_lm, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path.parent)
  result = main.run(quick_config(), tmp_path.name, lm=tiny_lm)  # a relative workdir
  for key in ('label', 'token_id', 'probability', 'top10', 'steps', 'wall_seconds',
              'steps_per_second', 'final_losses', 'heldout', 'config', 'identifiable',
              'verdict', 'steps_to_p90'):
    assert key in result
  assert result['steps'] == 12 and len(result['top10']) == 10
  roles = [s['role'] for s in result['heldout']['scores']]
  assert roles[0] == 'found' and 'reference' in roles and roles.count('random') == 2
  assert all(0 <= s['auroc'] <= 1 for s in result['heldout']['scores'])
  with open(tmp_path / 'trajectory.jsonl') as f:
    lines = [json.loads(x) for x in f]
  assert [r['step'] for r in lines] == list(range(1, 13))
  assert (tmp_path / 'trajectory.png').stat().st_size > 10_000
  on_disk = json.loads((tmp_path / 'result.json').read_text())
  assert on_disk['label'] == result['label']
  # A finished workdir is reported, not recomputed.
  again = main.run(quick_config(), str(tmp_path), lm=tiny_lm)
  assert again['wall_seconds'] == result['wall_seconds']
  # The terminal summary: a label the final choice picked is shown with the descent it replaced.
  for changed in (False, True):
    shown = {**result, 'choice': {**result['choice'], 'changed': changed},
             'descent_label': ' other', 'descent_probability': 0.987}
    first, second = views.summary(shown).splitlines()[:2]
    assert first.startswith(f"Feature 'animal': label {result['label']!r} (p=")
    assert ('under the descent' in first) == changed
    assert ("(descent ended on ' other', p=0.987;" in second) == changed
  # The best finalist after the label, against it on the choice's own training examples.
  second = result['choice']['runner_up']
  finalists = {c['token']: c['train_auroc'] for c in result['choice']['candidates']
               if c['examples'] == result['choice']['examples']}
  assert second['token'] in finalists and second['token'] != result['label']
  assert second['train_auroc'] == max(a for t, a in finalists.items() if t != result['label'])
  assert second['difference'] == pytest.approx(result['train_auroc'] - second['train_auroc'])
  assert second['difference'] >= 0 and len(second['difference_interval']) == 2
  # A close choice is said so; a clear one, or a record without a runner-up, is not.
  for interval, close in (([-0.02, 0.04], True), ([0.005, 0.04], False), (None, False)):
    shown = {**result, 'choice': {**result['choice'], 'runner_up': {
        **second, 'token': ' other', 'difference': 0.01, 'difference_interval': interval}}}
    assert ("(a close choice: ' other' scores" in views.summary(shown)) == close
  assert 'a close choice' not in views.summary(
      {**result, 'choice': {k: v for k, v in result['choice'].items() if k != 'runner_up'}})


def test_rating_prompt_runs(tiny_lm, tmp_path):
  """The paper's zero-shot chat prompt: chat template, answers '1'/'0' after 'Rating: '."""
  config = config_defaults.apply_arg(quick_config(steps=2), 'rating')
  result = main.run(config, str(tmp_path), lm=tiny_lm)
  assert result['steps'] == 2 and result['config']['prompt']['yes'] == '1'


def test_a_named_model_brings_its_prompt_and_later_arguments_win():
  base = config_defaults.get_base_config
  assert base().label.init == 'prior'  # every model starts from its own guess at the slot
  qwen = config_defaults.apply_arg(base(), 'model=qwen2.5-coder-1.5b')
  assert qwen.model.source == 'qwen2.5-coder-1.5b'
  assert qwen.prompt.user == config_defaults.QUESTION_CHAT_PROMPT['user']
  later = config_defaults.apply_arg(base(), 'model=qwen2.5-coder-1.5b,label.init=zeros,rating')
  assert later.label.init == 'zeros' and later.prompt.yes == '1'
  small = config_defaults.apply_arg(base(), 'model=qwen2.5-coder-1.5b,model=smollm2-135m')
  assert small.prompt.chat is False  # the 1.5B's prompt undone
  other = config_defaults.apply_arg(base(), 'model=qwen2.5-coder-1.5b,model=qwen2.5-coder-0.5b')
  assert other.prompt.user == config_defaults.FEWSHOT_CHAT_PROMPT['user']
  folder = config_defaults.apply_arg(base(), 'rating,model=/models/llama')  # not named
  assert folder.prompt.yes == '1' and folder.model.source == '/models/llama'  # config's own


def test_a_run_can_start_from_the_models_prior(tiny_lm, tmp_path):
  """label.init=prior through the whole command: the first step's p is the model's guess at the
  slot (far from uniform), not the zeros start's 1/V."""
  result = main.run(quick_config(steps=1, **{'label.init': 'prior', 'optim.lr': 1e-6}),
                    str(tmp_path), lm=tiny_lm)
  first = json.loads((tmp_path / 'trajectory.jsonl').read_text().splitlines()[0])
  allowed = int(np.sum(label_lib.allowed_tokens(tiny_lm.tokenizer, tiny_lm.config.vocab_size)))
  assert result['status'] == 'finished' and first['top'][0][1] > 5 / allowed


def test_workdir_with_another_config_is_refused(tiny_lm, tmp_path):
  main.run(quick_config(steps=2), str(tmp_path), lm=tiny_lm)
  with pytest.raises(WorkdirError, match='optim'):
    main.run(quick_config(**{'optim.lr': 0.5}), str(tmp_path), lm=tiny_lm)


def test_unknown_feature_is_a_clear_error(tiny_lm, tmp_path):
  with pytest.raises(ConfigValueError, match=r"Unknown feature 'unicorn'.*chinese, animal"):
    main.run(quick_config('unicorn'), str(tmp_path), lm=tiny_lm)


@pytest.mark.parametrize('key, value, match', [
    ('loss.answer', 'fuzzy', 'loss.answer'), ('steps', 0, 'steps'),
    ('data.positive_fraction', 1.0, 'positive_fraction'), ('label.num_tokens', 9, 'num_tokens'),
    ('steps', 10**10, 'steps'), ('label.temperature', 1e-30, 'temperature')])
def test_bad_config_values_are_clear_errors(tmp_path, key, value, match):
  with pytest.raises(ConfigValueError, match=match):
    main.run(quick_config(**{key: value}), str(tmp_path))  # fails before loading a model


def test_records_without_positives_are_refused(tiny_lm, tmp_path):
  path = tmp_path / 'flat.jsonl'
  path.write_text(json.dumps({'tokens': ['The', ' cat', ' sat'], 'activations': [0.1, 0.2, 0.0]})
                  + '\n')
  config = quick_config('', **{'feature.records': str(path), 'feature.threshold': 0.5})
  with pytest.raises(FeatureError, match='threshold') as err:
    main.run(config, str(tmp_path / 'w'), lm=tiny_lm)
  # The hint, followed literally in the same workdir, is not refused as "another config": the
  # failed run did not pin it (it fails later, for want of negatives, not of a workdir).
  hinted = re.search(r'--config\.feature\.threshold=([0-9.]+)', str(err.value)).group(1)
  config.feature.threshold = float(hinted)
  with pytest.raises(FeatureError, match='no negative|no positive'):
    main.run(config, str(tmp_path / 'w'), lm=tiny_lm)


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_lm, tmp_path):
  """Weights that turn the loss NaN at the first step (as a broken checkpoint would): the run
  exits with one line, keeping the last good state (the initial one) in its checkpoint."""
  import dataclasses

  import jax
  params = dict(tiny_lm.params)
  params['final_norm'] = jax.tree.map(lambda x: x * np.nan, params['final_norm'])
  broken = dataclasses.replace(tiny_lm, params=params)
  with pytest.raises(NonFiniteLossError, match='non-finite') as err:
    main.run(quick_config(), str(tmp_path), lm=broken)
  assert 'checkpoints' in str(err.value) and 'step 0' in str(err.value)
  step, state = _restored(str(tmp_path))
  assert np.asarray(state['rows']['step']).tolist() == [0]
  assert np.asarray(state['status']).tolist() == [2]  # non-finite
  assert not (tmp_path / 'result.json').exists()


def _main(workdir, source, *extra):
  cmd = [sys.executable, '-m', 'tokenspace_jax.main', '--config=configs/animal.py:quick',
         f'--workdir={workdir}', f'--config.model.source={source}', '--config.steps=16',
         '--config.checkpoint_every=4', '--config.early_stop.prob=0', '--config.progress=False',
         *extra]
  return cmd


def _restored(workdir):
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), 1)
  step = ckpt._manager.latest_step()
  return step, ckpt._manager.restore(step)


def _final_label(workdir):
  step, restored = _restored(workdir)
  return step, np.asarray(restored['rows']['label']['logits'])


def test_sigterm_then_resume_equals_uninterrupted_run(tiny_folder, tmp_path):
  # The killed and the resumed run without the tests' shared compilation cache: each keeps its
  # own in its workdir, and the resumed run loads what the killed one compiled.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['PYTHONUNBUFFERED'] = '1'
  straight = tmp_path / 'straight'
  subprocess.run(_main(straight, tiny_folder), cwd=ROOT, check=True, capture_output=True,
                 timeout=600)

  killed = tmp_path / 'killed'
  proc = subprocess.Popen(_main(killed, tiny_folder), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  trajectory = killed / 'trajectory.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if trajectory.exists() and len(trajectory.read_text().splitlines()) >= 6:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err.decode()[-2000:]
  assert b'Rerun the same command to resume' in err
  assert not (killed / 'result.json').exists()
  stopped_at = len(trajectory.read_text().splitlines())
  assert 6 <= stopped_at < 16
  compiled = sorted(os.listdir(killed / 'compilation_cache'))
  assert any(name.endswith('-cache') for name in compiled), compiled

  resumed = subprocess.run(_main(killed, tiny_folder), cwd=ROOT,
                           env={**env, 'JAX_LOG_COMPILES': '1'}, capture_output=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
  assert b'Resumed from the checkpoint' in resumed.stderr
  assert b'Persistent compilation cache hit' in resumed.stderr
  step_a, label_a = _final_label(straight)
  step_b, label_b = _final_label(killed)
  assert step_a == step_b == 16
  np.testing.assert_array_equal(label_a, label_b)
  lines = lambda d: [json.loads(x) for x in (d / 'trajectory.jsonl').read_text().splitlines()]
  a, b = lines(straight), lines(killed)
  assert [r['step'] for r in b] == list(range(1, 17))
  np.testing.assert_allclose([r['loss'] for r in a], [r['loss'] for r in b], rtol=0, atol=0)


def test_unknown_config_key_is_a_clear_error(tiny_folder, tmp_path):
  proc = subprocess.run(_main(tmp_path, tiny_folder, '--config.optim.lrr=0.3'), cwd=ROOT,
                        capture_output=True, timeout=300)
  assert proc.returncode != 0
  err = proc.stderr.decode()
  assert 'lrr' in err and 'Traceback' not in err


def test_main_on_simulated_meshes(tiny_folder, tmp_path):
  """``main`` on simulated CPU devices, the default mesh (data=-1) taking them all: the examples
  split over 4 data shards, the weights replicated (4x1, 4 devices) or split over 2 model shards
  (4x2, 8 devices). Both share the layout and schedule, so
  they must descend alike; a mesh that does not fit the devices is a one-line error."""
  runs = {}
  for name, devices, extra in (('4x1', 4, []), ('4x2', 8, ['--config.mesh.model=2']),
                               ('3x2', 8, ['--config.mesh.data=3', '--config.mesh.model=2'])):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    cmd = _main(tmp_path / name, tiny_folder, '--config.steps=8', *extra)
    runs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
  out = {name: p.communicate(timeout=600) for name, p in runs.items()}
  err = out['3x2'][1].decode()
  assert runs['3x2'].returncode == 1 and 'mesh' in err and 'Traceback' not in err, err[-2000:]
  for name in ('4x1', '4x2'):
    assert runs[name].returncode == 0, out[name][1].decode()[-3000:]
    mesh = f"Mesh {{'data': 4, 'model': {name[-1]}}} over {4 * int(name[-1])} devices"
    assert mesh in out[name][1].decode()
  results = {n: json.loads((tmp_path / n / 'result.json').read_text()) for n in ('4x1', '4x2')}
  lines = {n: [json.loads(x) for x in (tmp_path / n / 'trajectory.jsonl').read_text().splitlines()]
           for n in results}
  assert [r['step'] for r in lines['4x2']] == list(range(1, 9))
  # Float rounding only: the model shards sum the matmuls (and the contrast baseline's margins)
  # in another order.
  np.testing.assert_allclose([r['loss'] for r in lines['4x1']], [r['loss'] for r in lines['4x2']],
                             rtol=5e-6, atol=1e-5)
  assert results['4x1']['label'] == results['4x2']['label']
  aurocs = lambda r: [s['auroc'] for s in r['heldout']['scores']]
  np.testing.assert_allclose(aurocs(results['4x1']), aurocs(results['4x2']), atol=1e-6)
  assert results['4x2']['heldout']['examples'] == 32  # every held-out example, none padded


def test_sweep_rows_equal_separate_runs(tiny_lm, tmp_path):
  """Rows of a sweep (2 learning rates x 2 restarts in one vmapped step) against single runs:
  restart 0 of each learning rate must follow the single run with that rate."""
  changes = {'sweep.grid': 'optim.lr=0.05,0.3', 'sweep.restarts': 2, 'early_stop.prob': 0.0}
  result = main.run(quick_config(**changes), str(tmp_path / 'sweep'), lm=tiny_lm)
  assert [(r['lr'], r['restart']) for r in result['rows']] == [(0.05, 0), (0.05, 1), (0.3, 0),
                                                               (0.3, 1)]
  traj = [json.loads(x) for x in (tmp_path / 'sweep' / 'trajectory.jsonl').read_text()
          .splitlines()]
  assert len(traj) == 12 * 4 and [t['row'] for t in traj[:4]] == [0, 1, 2, 3]
  of_row = lambda r: [t for t in traj if t['row'] == r]
  for row, lr in ((0, 0.05), (2, 0.3)):
    single = main.run(quick_config(**{'optim.lr': lr}), str(tmp_path / f'lr{lr}'), lm=tiny_lm)
    lines = [json.loads(x) for x in (tmp_path / f'lr{lr}' / 'trajectory.jsonl').read_text()
             .splitlines()]
    np.testing.assert_allclose([t['loss'] for t in of_row(row)], [r['loss'] for r in lines],
                               rtol=0, atol=2e-5)
    assert result['rows'][row]['label'] == single['label']
    assert result['rows'][row]['heldout']['scores'][0]['auroc'] == pytest.approx(
        single['heldout']['scores'][0]['auroc'], abs=1e-6)
  # Restarts start elsewhere: their first losses differ from restart 0's.
  assert of_row(1)[0]['loss'] != of_row(0)[0]['loss']
  assert sorted(sum(result['agreement'].values(), [])) == [0, 1, 2, 3]
  best = max(result['rows'], key=lambda r: (r['train_auroc'], -r['row']))
  assert result['best_row'] == best['row']  # chosen on the training split, never held-out
  assert 'agreement' in views.sweep_summary(result)


def test_two_token_label_run(tiny_lm, tmp_path):
  """A two-token slot end to end: the label is read as text, each position reported, and the
  baselines fill the same two-token slot."""
  result = main.run(quick_config(steps=3, **{'label.num_tokens': 2}), str(tmp_path),
                        lm=tiny_lm)
  tok = tiny_lm.tokenizer
  assert len(result['token_id']) == 2 and result['label'] == tok.decode(result['token_id'])
  assert [len(p) for p in result['positions']] == [5, 5]
  assert [p[0]['id'] for p in result['positions']] == result['descent_token_id']
  scores = {s['role']: s for s in result['heldout']['scores']}
  assert scores['reference']['token_id'] == tok(' animal', add_special_tokens=False)['input_ids']
  assert all(len(s['token_id']) == 2 for s in result['heldout']['scores'] if s['role'] == 'random')
  lines = [json.loads(x) for x in (tmp_path / 'trajectory.jsonl').read_text().splitlines()]
  assert len(lines[-1]['label_p']) == 2


def test_main_runs_a_sweep_when_asked(tiny_folder, tmp_path):
  """``main`` with restarts: one sweep.json with a row per restart, the table on stdout."""
  proc = subprocess.run(_main(tmp_path, tiny_folder, '--config.steps=3',
                              '--config.sweep.restarts=2'), cwd=ROOT, capture_output=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr.decode()[-2000:]
  result = json.loads((tmp_path / 'sweep.json').read_text())
  assert [r['restart'] for r in result['rows']] == [0, 1]
  assert 'agreement' in proc.stdout.decode() and not (tmp_path / 'result.json').exists()
  bad = subprocess.run(_main(tmp_path / 'bad', tiny_folder, "--config.sweep.grid=optim.lrr=1"),
                       cwd=ROOT, capture_output=True, timeout=600)
  assert bad.returncode == 1 and 'sweep.grid' in bad.stderr.decode()
  assert 'Traceback' not in bad.stderr.decode()


def test_pool_keeps_each_features_mean_prior_and_drops_the_per_example_rows(tiny_lm, monkeypatch):
  from tokenspace_jax.classifier import prefix
  from tokenspace_jax.engine import pool as pool_lib
  from tokenspace_jax.features import load_synthetic_feature as load_feature

  built = []
  real = prefix.prefix_caches
  monkeypatch.setattr(prefix, 'prefix_caches', lambda *a, **k: built.append(real(*a, **k))
                      or built[-1])
  config = quick_config(**{'contrast.labels': 0})
  features = [load_feature('animal'), load_feature('number')]
  pool = pool_lib.build_pool(config, tiny_lm, features)
  assert pool.caches.log_prior is None
  per_example = np.asarray(built[0].log_prior)
  for f in range(2):
    slots = pool.slot_of[pool.split(f, train=True)]
    np.testing.assert_allclose(pool.mean_log_priors[f], per_example[slots].mean(0), rtol=1e-5,
                               atol=1e-6)
  assert not np.allclose(pool.mean_log_priors[0], pool.mean_log_priors[1])


def test_a_row_stepped_alone_steps_as_it_does_among_all(tiny_lm):
  """``select`` (what the loop steps once other rows have stopped) gives a row its own
  feature's schedule, prior and hyperparameters: stepped alone it ends where it does beside the
  others."""
  import jax
  import jax.numpy as jnp

  from tokenspace_jax.engine import pool as pool_lib
  from tokenspace_jax.engine.run import prepare_descent
  from tokenspace_jax.features import load_synthetic_feature as load_feature

  config = quick_config(**{'sweep.grid': 'optim.lr=0.05,0.3'})
  pool = pool_lib.build_pool(config, tiny_lm, [load_feature('animal'), load_feature('number')])
  d = prepare_descent(config, tiny_lm, pool)
  assert [(s.feature, s.lr) for s in d.specs] == [(0, 0.05), (0, 0.3), (1, 0.05), (1, 0.3)]
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  rows = d.state['rows']
  alone_rows, alone_data, alone_hp = d.select(copy(rows), np.array([2]))
  together = copy(rows)
  for _ in range(3):
    together, _ = d.step(together, d.data, d.hp, jnp.ones(4, bool))
    alone_rows, _ = d.step(alone_rows, alone_data, alone_hp, jnp.ones(1, bool))
  for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone_rows), strict=True):
    np.testing.assert_allclose(np.asarray(a)[2:3], np.asarray(b), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(together['label']['logits'][2]),
                         np.asarray(together['label']['logits'][0]))


def test_cache_dtype_keeps_the_pools_caches_in_bfloat16(tiny_lm):
  import jax.numpy as jnp

  from tokenspace_jax.engine import pool as pool_lib
  from tokenspace_jax.features import load_synthetic_feature as load_feature

  pools = {name: pool_lib.build_pool(quick_config(**{'model.cache_dtype': name}), tiny_lm,
                                     [load_feature('animal')])
           for name in ('', 'bfloat16')}
  assert pools[''].caches.k.dtype == jnp.float32
  assert pools['bfloat16'].caches.k.dtype == pools['bfloat16'].caches.v.dtype == jnp.bfloat16
  # The contrast baselines are read through the stored caches, so they move by bfloat16's
  # rounding only.
  want, got = (np.asarray(p.caches.baseline) for p in pools.values())
  assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()
