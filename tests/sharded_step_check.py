"""The engine's label-rows step on the problem of ``sharding_rig``, on simulated devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python tests/sharded_step_check.py OUT.npz 8x1,4x2 [PROCESS_ID NUM_PROCESSES PORT]

Run by tests/test_sharding.py in child processes: the device count (and the process group) must
be set before JAX starts. With a process id, the processes join over localhost and each feeds
only the slices of its own devices; process 0 writes the file.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenspace_jax.parallel import distributed  # noqa: E402


def main(out_path: str, meshes: str, process_id: str | None = None,
         num_processes: str | None = None, port: str | None = None):
  if process_id is None:
    multi = distributed.initialize()  # nothing to detect here: single process
    assert not multi
  else:
    distributed.initialize(f'localhost:{port}', int(num_processes), int(process_id))

  import jax
  import numpy as np
  import sharding_rig as rig

  from tokenspace_jax.engine import rows
  from tokenspace_jax.parallel import sharding

  results = {'devices': np.asarray(jax.device_count()),
             'local_devices': np.asarray(jax.local_device_count())}
  model, params = rig.tiny_model()
  objective, optimizer = rig.objective_and_optimizer(model)
  for spec in meshes.split(','):
    data_size, model_size = map(int, spec.split('x'))
    mesh = sharding.make_mesh(data=data_size, model=model_size)
    host, _ = rig.host_problem(model, params, data_size)
    host = rig.as_rows(host)
    data = distributed.put_global(host, sharding.data_shardings(host, mesh))
    state = distributed.put_global(jax.device_get(rig.rows_state(optimizer)),
                                   sharding.replicated(mesh))
    step = rows.make_rows_step(objective, optimizer, rig.LR, mesh, host)
    for k, v in rig.run_steps(step, state, data, rows=True).items():
      results[f'{spec}/{k}'] = v
    # Each device holds only its block of the caches (and its kv heads, when model > 1).
    k_shape = data.caches.k.addressable_shards[0].data.shape
    results[f'{spec}/cache_shard_shape'] = np.asarray(k_shape)
    results[f'{spec}/cache_shape'] = np.asarray(data.caches.k.shape)
    results[f'{spec}/context_shard_shape'] = np.asarray(
        data.caches.context_k.addressable_shards[0].data.shape)
  if distributed.is_main_process():
    np.savez(out_path, **results)


if __name__ == '__main__':
  main(*sys.argv[1:])
