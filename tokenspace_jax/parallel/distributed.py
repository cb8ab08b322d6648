"""Multi-host wiring: joining the processes of one job, and feeding each its share of the data.

JAX runs one process per host; together they see every device of a pod slice, and one jitted
program runs on all of them. ``initialize`` must run before anything touches a device. Where it
gets its parameters, in order:

1. the arguments;
2. the environment: ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
   ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (for GPU hosts, or any machine set by hand);
3. auto-detection by ``jax.distributed.initialize()`` itself: Cloud TPU VMs and pod slices,
   SLURM and Open MPI jobs.

On a machine that is none of these it does nothing, and the run is single-process.

Each process builds only the parts of a global array that live on its own devices
(``put_global``), so a host computes and holds only its examples' prefix caches; only process 0
writes results and logs (``is_main_process``).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger('tokenspace_jax')

_ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


class DistributedSetupError(RuntimeError):
  pass


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto_detect: bool = True) -> bool:
  """Joins the multi-process job; returns whether there is more than one process."""
  address = coordinator_address or os.environ.get(_ENV[0])
  count = num_processes if num_processes is not None else _env_int(_ENV[1])
  index = process_id if process_id is not None else _env_int(_ENV[2])
  given = [v is not None for v in (address, count, index)]
  if any(given) and not all(given):
    missing = [n for n, g in zip(_ENV, given, strict=True) if not g]
    raise DistributedSetupError(
        f'A multi-process run needs the coordinator address, the process count and this '
        f'process\'s id; missing: {missing} (arguments or environment variables).')
  if all(given):
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index)
  elif auto_detect:
    try:
      jax.distributed.initialize()
    except ValueError as e:  # no cluster detected: 'coordinator_address should be defined.'
      log.debug('No multi-process cluster detected (%s); running single-process.', e)
      return False
  else:
    return False
  log.info('Process %d of %d; %d local of %d devices.', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedSetupError(f'{name}={value!r} is not an integer.') from None


def is_main_process() -> bool:
  """Only process 0 writes results, checkpoints' metadata and logs."""
  return jax.process_index() == 0


def put_global(host, shardings):
  """Global arrays from host values, each process reading only the slices its devices hold.

  ``host`` is a tree of array-likes indexable by tuples of slices (numpy arrays, memmaps, or
  lazy readers that compute only the rows asked for); ``shardings`` a matching tree (or one
  sharding for all). The unread slices of another process's devices are never touched.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, host)

  def put(x, s):
    shape = tuple(x.shape)
    return jax.make_array_from_callback(shape, s, lambda idx: np.asarray(x[idx]))

  return jax.tree.map(put, host, shardings)


def local_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...], axis: int = 0,
               ) -> np.ndarray:
  """The indices along ``axis`` that this process's devices hold: the examples whose prefix
  caches this host must compute."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(*index[axis].indices(shape[axis])))
  return np.asarray(sorted(rows), np.int64)
