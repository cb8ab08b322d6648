"""Meshes, sharding rules, the example layout, and the data-parallel step against one device.

The multi-device checks run ``sharded_step_check.py`` in child processes: simulated CPU devices
(and a process group) must be configured before JAX starts, and this process has one device.
The children are started once, in the background, and the references are computed here while
they run.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sharding_rig as rig
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from tokenspace_jax.engine import descent, rows, sampler
from tokenspace_jax.models.config import PRESETS
from tokenspace_jax.models.llama import Llama
from tokenspace_jax.models.loading.param_mapping import abstract_params
from tokenspace_jax.parallel import distributed, shard_layout, sharding

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


def _abstract_mesh(data, model):
  return AbstractMesh((data, model), (sharding.DATA, sharding.MODEL))


def test_mesh_shape_resolves_the_remaining_devices():
  assert sharding.mesh_shape(-1, 1, 8) == (8, 1)
  assert sharding.mesh_shape(-1, 2, 8) == (4, 2)
  assert sharding.mesh_shape(2, -1, 8) == (2, 4)
  for bad in ((-1, 3, 8), (3, 2, 8), (-1, -1, 8), (0, 1, 8)):
    with pytest.raises(sharding.MeshError):
      sharding.mesh_shape(*bad)
  mesh = sharding.make_mesh(data=-1, model=1)
  assert dict(mesh.shape) == {'data': jax.device_count(), 'model': 1}


def test_llama3_8b_tensor_parallel_rules():
  model = Llama(PRESETS['llama3-8b'], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = abstract_params(model)
  specs = sharding.param_specs(params, _abstract_mesh(1, 8))
  assert specs['embed'] == P('model', None)
  assert specs['lm_head'] == P(None, 'model')
  for name in ('q', 'k', 'v'):
    assert specs['layers']['attn'][name]['kernel'] == P(None, None, 'model')
  assert specs['layers']['attn']['o']['kernel'] == P(None, 'model', None)
  assert specs['layers']['mlp']['gate']['kernel'] == P(None, None, 'model')
  assert specs['layers']['mlp']['down']['kernel'] == P(None, 'model', None)
  assert specs['layers']['attn_norm']['scale'] == P(None, None)
  assert specs['final_norm']['scale'] == P(None)
  # 3 divides the vocabulary (128256) but not the hidden or head axes: those stay whole.
  specs = sharding.param_specs(params, _abstract_mesh(1, 3))
  assert specs['embed'] == P('model', None)
  assert specs['layers']['attn']['q']['kernel'] == P(None, None, None)


def test_data_specs_split_examples_on_data_and_kv_heads_on_model():
  host, _ = rig.host_problem(*rig.tiny_model(), 4)
  specs = sharding.data_specs(host, _abstract_mesh(4, 2))
  assert specs.caches.k == P(None, 'data', 'model', None)  # packed tokens
  assert specs.caches.valid == P('data', None) and specs.caches.start == P('data')
  assert specs.caches.log_prior == P('data', 'model')
  # Contexts are split like the examples: each shard holds the block its examples read.
  assert specs.caches.context_k == P(None, 'data', 'model', None)
  assert specs.caches.context_valid == P('data', None)
  assert specs.caches.context_start == P('data') and specs.caches.context_of == P('data')
  assert specs.targets == P('data') and specs.schedule == P(None, 'data')
  assert specs.allowed == P() and specs.params['embed'] == P('model', None)
  manual = sharding.data_axis_specs(specs)
  assert manual.caches.k == P(None, 'data', None, None)
  assert manual.params['embed'] == P(None, None)
  with pytest.raises(sharding.MeshError, match='batch'):
    sharding.data_specs(host.replace(schedule=host.schedule[:, :15]), _abstract_mesh(4, 2))
  # The engine's schedule has a leading row axis; the batch is still the last.
  assert sharding.data_specs(rig.as_rows(host), _abstract_mesh(4, 2)).schedule == P(
      None, None, 'data')


def test_layout_is_the_identity_on_one_shard_and_balanced_on_many():
  targets = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1], np.float32)
  train = np.arange(14) < 10
  one = shard_layout.layout_examples(targets, train, data=1)
  np.testing.assert_array_equal(one.order, np.arange(14))
  assert not one.padding.any()
  positives, negatives = np.flatnonzero(targets[:10] > 0.5), np.flatnonzero(targets[:10] <= 0.5)
  np.testing.assert_array_equal(
      shard_layout.shard_schedule(one, targets, 7, 4, 0.5, seed=3),
      sampler.batch_schedule(positives, negatives, 7, 4, 0.5, seed=3))

  four = shard_layout.layout_examples(targets, train, data=4)
  assert four.slots == 16 and four.padding.sum() == 2
  real = four.order[~four.padding]
  np.testing.assert_array_equal(np.sort(real), np.arange(14))
  np.testing.assert_array_equal(four.order[four.slot_of()], np.arange(14))
  schedule = shard_layout.shard_schedule(four, targets, 20, 8, 0.5, seed=0)
  assert schedule.shape == (20, 8) and schedule.max() < four.n_local
  drawn = four.order[shard_layout.to_global(schedule, four)]
  assert (drawn < 10).all()  # only train examples, never padding or held-out ones
  block = shard_layout.to_global(schedule, four) // four.n_local
  np.testing.assert_array_equal(block, np.repeat(np.arange(4), 2)[None].repeat(20, 0))
  np.testing.assert_array_equal(targets[drawn].sum(1), 4)  # one positive per device per step
  with pytest.raises(shard_layout.LayoutError, match='multiple'):
    shard_layout.shard_schedule(four, targets, 5, 6, 0.5, seed=0)
  with pytest.raises(shard_layout.LayoutError, match='positives'):
    shard_layout.shard_schedule(shard_layout.layout_examples(targets, train, 6), targets, 5, 12,
                                0.5, seed=0)


def test_layout_of_several_features_gives_each_shard_each_features_share():
  """A pool of two features on 2 shards: each shard holds both features' positives and
  negatives, and a feature's schedule draws only its own train examples."""
  targets = np.tile(np.array([1, 0, 1, 0, 0, 1, 0, 1, 1, 0], np.float32), 2)
  groups = np.repeat([0, 1], 10)
  train = np.tile(np.arange(10) < 8, 2)
  layout = shard_layout.layout_examples(targets, train, 2, groups, n_local=12)
  assert layout.n_local == 12 and layout.padding.sum() == 4
  for f in (0, 1):
    schedule = shard_layout.to_global(
        shard_layout.shard_schedule(layout, targets, 6, 4, 0.5, seed=0, group=f), layout)
    drawn = layout.order[schedule]
    assert (groups[drawn] == f).all() and train[drawn].all()
    np.testing.assert_array_equal(targets[drawn].sum(1), 2)
  with pytest.raises(shard_layout.LayoutError, match='do not fit'):
    shard_layout.layout_examples(targets, train, 2, groups, n_local=9)


def test_rows_step_on_a_one_device_mesh_reproduces_make_step():
  model, params = rig.tiny_model()
  objective, optimizer = rig.objective_and_optimizer(model)
  host, _ = rig.host_problem(model, params, 1)
  host = rig.as_rows(host)
  expected = _reference(1)  # descent.make_step on the same layout, schedule and state
  mesh = sharding.make_mesh(data=1, model=1)
  sharded = distributed.put_global(host, sharding.data_shardings(host, mesh))
  state = jax.device_put(rig.rows_state(optimizer), sharding.replicated(mesh))
  step = rows.make_rows_step(objective, optimizer, rig.LR, mesh, host)
  got = rig.run_steps(step, state, sharded, rows=True)
  for k, v in expected.items():
    np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-6, err_msg=k)


def test_distributed_helpers_in_one_process(monkeypatch):
  assert distributed.initialize(auto_detect=False) is False
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'localhost:1234')
  with pytest.raises(distributed.DistributedSetupError, match='JAX_NUM_PROCESSES'):
    distributed.initialize()
  monkeypatch.setenv('JAX_NUM_PROCESSES', 'two')
  with pytest.raises(distributed.DistributedSetupError, match='not an integer'):
    distributed.initialize()
  assert distributed.is_main_process()
  mesh = sharding.make_mesh()
  x = np.arange(12.0).reshape(4, 3)
  placed = distributed.put_global({'x': x}, sharding.replicated(mesh))
  np.testing.assert_array_equal(placed['x'], x)
  rows = distributed.local_rows(sharding.replicated(mesh), x.shape)
  np.testing.assert_array_equal(rows, range(4))


# --- multi-device checks, in child processes ------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _child(out, meshes, devices, *process):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)
  cmd = [sys.executable, os.path.join(HERE, 'sharded_step_check.py'), str(out), meshes,
         *map(str, process)]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


_CHILD_TESTS = {'single': 'test_sharded_step_matches_one_device',
                'multi': 'test_two_processes_match_one_process'}


@pytest.fixture(scope='module', autouse=True)
def children(request, tmp_path_factory):
  """One 8-device process (meshes 8x1, 4x2 and 1x8), and two 4-device processes joined as one job
  (mesh 4x2: the data axis spans both processes). Started with the module, for the selected
  tests only, so they compile while this process runs the other tests."""
  selected = {item.name for item in request.session.items}
  folder = tmp_path_factory.mktemp('sharded')
  procs = {}
  if _CHILD_TESTS['single'] in selected:
    procs['single'] = [_child(folder / 'single.npz', '8x1,4x2,1x8', 8)]
  if _CHILD_TESTS['multi'] in selected:
    port = _free_port()
    procs['multi'] = [_child(folder / 'multi.npz', '4x2', 4, i, 2, port) for i in range(2)]
  yield folder, procs
  for group in procs.values():
    for p in group:
      if p.poll() is None:
        p.kill()
        p.wait()


def _wait(procs, timeout=600):
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, f'child failed ({p.returncode}):\n{out[-4000:]}'


@functools.cache
def _reference(data_shards):
  return rig.reference(data_shards, _shared_step())


@functools.cache
def _shared_step():
  return descent.make_step(*rig.objective_and_optimizer(rig.tiny_model()[0]))


def _assert_matches(results, mesh, data_shards):
  expected = _reference(data_shards)
  for k, v in expected.items():
    if k == 'compilations':
      continue
    np.testing.assert_allclose(results[f'{mesh}/{k}'], v, rtol=0, atol=TOL,
                               err_msg=f'{mesh}: {k}')
  assert int(results[f'{mesh}/compilations']) == 1  # one compilation for all steps
  # Without the all-reduce each device would follow its own share: far outside the tolerance.
  assert np.abs(expected['grad_logits']).max() > 1e3 * TOL


def test_sharded_step_matches_one_device(children):
  folder, procs = children
  expected = {d: _reference(d) for d in (8, 4, 1)}  # computed while the children run
  _wait(procs['single'])
  results = np.load(folder / 'single.npz')
  assert int(results['devices']) == 8
  _assert_matches(results, '8x1', 8)
  _assert_matches(results, '4x2', 4)
  _assert_matches(results, '1x8', 1)  # pure tensor parallelism: no data axis to reduce over
  # Each device holds its data shard's share of the packed tokens, and its kv heads.
  total = int(results['8x1/cache_shape'][1])
  np.testing.assert_array_equal(results['8x1/cache_shard_shape'], [2, total // 8, 2, 8])
  total = int(results['4x2/cache_shape'][1])
  np.testing.assert_array_equal(results['4x2/cache_shard_shape'], [2, total // 4, 1, 8])
  assert expected[8]['loss'][0] != expected[4]['loss'][0]  # the layouts draw other batches


def test_two_processes_match_one_process(children):
  folder, procs = children
  _wait(procs['multi'])
  results = np.load(folder / 'multi.npz')  # written by process 0 only
  assert int(results['devices']) == 8 and int(results['local_devices']) == 4
  _assert_matches(results, '4x2', 4)


def test_prefix_caches_written_into_sharded_buffers_equal_the_concatenated_ones():
  """The placed pass writes chunks (the last one partial) into preallocated buffers."""
  from tokenspace_jax.classifier import prefix
  model, params = rig.tiny_model()
  rng = np.random.default_rng(1)
  ids = rng.integers(5, rig.TINY.vocab_size, (11, 6)).astype(np.int32)
  mask = np.ones(ids.shape, bool)
  mask[::3, :2] = False
  shared = np.asarray([9, 10, 11], np.int32)
  plain = prefix.prefix_caches(model, params, shared, ids, mask, chunk=4)
  mesh = sharding.make_mesh(data=1, model=1)
  placed = prefix.prefix_caches(model, params, shared, ids, mask, chunk=4,
                                    out_shardings=lambda a: sharding.cache_shardings(a, mesh))
  assert placed.k.sharding == jax.sharding.NamedSharding(mesh, P(None, 'data', 'model', None))
  for name in ('k', 'v', 'valid', 'start', 'log_prior', 'shared_k', 'shared_v'):
    np.testing.assert_array_equal(getattr(placed, name), getattr(plain, name), err_msg=name)
