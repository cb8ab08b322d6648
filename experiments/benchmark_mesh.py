"""Steps per second of the data-parallel step on 1, 2, 4 and 8 simulated CPU devices.

    python experiments/benchmark_mesh.py            # ~10 minutes on 2 CPU cores
    python experiments/benchmark_mesh.py --devices 1,8 --steps 10

The simulated devices (``--xla_force_host_platform_device_count``) all share this machine's
cores, so this measures what the mesh costs (the split of every batch, the gradient all-reduce,
one program per device), not a speed-up: with 2 cores the ideal is a flat line. Each device count
runs in its own process (the count is fixed when JAX starts): the embedded default model, the
``animal`` feature with ``configs/animal.py``'s few-shot prompt, batch 16, the examples and their
prefix caches split along ``data`` exactly as ``python -m tokenspace_jax.main`` does with
``--config.mesh.data=N``. The processes run one after another, twice in alternating order, and
the table takes each count's better median, so a change in load hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, '..', 'configs', 'animal.py')


def worker(devices: int, steps: int, batch: int) -> dict:
  import importlib.util

  import jax

  from tokenspace_jax.engine.pool import build_pool
  from tokenspace_jax.engine.run import prepare_descent
  from tokenspace_jax.features.from_config import load_feature
  from tokenspace_jax.models import load_model
  from tokenspace_jax.models.loading.param_mapping import abstract_params
  from tokenspace_jax.parallel import sharding

  spec = importlib.util.spec_from_file_location('animal_config', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.batch_size = batch
  config.steps = steps + 1
  config.feature.max_train, config.feature.max_heldout = 128, 32
  mesh = sharding.make_mesh(data=devices, model=1)
  lm = load_model('default', shardings=lambda m: sharding.param_shardings(
      abstract_params(m), mesh))
  pool = build_pool(config, lm, [load_feature(config.feature, lm.tokenizer)], mesh)
  d = prepare_descent(config, lm, pool)
  state, step = d.state['rows'], d.step
  active = jax.numpy.ones(1, bool)
  t0 = time.perf_counter()
  state, metrics = step(state, d.data, d.hp, active)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, d.data, d.hp, active)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  assert step._cache_size() == 1
  return {'devices': devices, 'mesh': dict(mesh.shape), 'compile_seconds': compile_seconds,
          'median_seconds': statistics.median(times), 'loss': float(metrics['loss'][0])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', default='1,2,4,8')
  parser.add_argument('--steps', type=int, default=12)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--out', default='/tmp/benchmark_mesh.json')
  parser.add_argument('--worker', type=int)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.steps, args.batch)))
    return
  counts = [int(d) for d in args.devices.split(',')]
  runs = {n: [] for n in counts}
  for r in range(args.repeats):
    for n in (counts if r % 2 == 0 else counts[::-1]):
      env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
      out = subprocess.run([sys.executable, __file__, '--worker', str(n), '--steps',
                            str(args.steps), '--batch', str(args.batch)], env=env,
                           capture_output=True, text=True, check=True)
      runs[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(f'  {n} devices: {runs[n][-1]["median_seconds"]:.3f} s/step '
            f'(load {os.getloadavg()[0]:.1f})', flush=True)
  print(f'\n{"devices":>7} {"mesh":>6} {"s/step":>8} {"steps/s":>8} {"vs 1":>6} {"compile":>8}')
  rows = []
  base = min(x['median_seconds'] for x in runs[counts[0]])
  for n in counts:
    best = min(runs[n], key=lambda x: x['median_seconds'])
    s = best['median_seconds']
    rows.append({**best, 'steps_per_second': 1 / s, 'relative_to_first': s / base})
    print(f'{n:7d} {best["mesh"]["data"]:>4}x{best["mesh"]["model"]} {s:8.3f} {1 / s:8.2f} '
          f'{s / base:6.2f} {best["compile_seconds"]:7.1f}s')
  with open(args.out, 'w') as f:
    json.dump({'command': ' '.join(sys.argv), 'rows': rows, 'runs': runs}, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
