"""Per-device memory of a Llama-3-8B labeling run on a v5e-8, from shapes alone.

Nothing is allocated: the parameters are ``jax.eval_shape`` of ``Llama.init``, the descent data
are ``ShapeDtypeStruct``s, and each array's per-device bytes are those of one shard under the
shardings of ``tokenspace_jax.sharding``.

The activations are what XLA reserves (``memory_analysis().temp_size_in_bytes``) for the
compiled data-parallel step on 8 simulated CPU devices, for a float32 twin of the model, halved.
Not the bfloat16 model itself: the CPU compiler has no bfloat16 matmul, and converts the stacked
weights to float32 once, outside the layer loop, so its bfloat16 figure is mostly weight copies a
TPU never makes. Halving the float32 figure slightly overstates the TPU's (attention scores and
logits stay float32 there; the CPU also materialises some transposed weights).

  python experiments/memory_table.py [--examples 512] [--prefix 256] [--batch 32] [--tail 3]

Results are in docs/scaling.md. Runs on CPU in about 10 s per mesh (compilation only).
"""

from __future__ import annotations

import os
import sys

if 'jax' not in sys.modules:  # simulated devices must be set before JAX starts
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_force_host_platform_device_count=8')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from tokenspace_jax.classifier.objective import LossWeights, Objective  # noqa: E402
from tokenspace_jax.classifier.prefix import PrefixCaches  # noqa: E402
from tokenspace_jax.engine import descent, rows  # noqa: E402
from tokenspace_jax.models.config import PRESETS  # noqa: E402
from tokenspace_jax.models.llama import Llama  # noqa: E402
from tokenspace_jax.models.loading.param_mapping import abstract_params  # noqa: E402
from tokenspace_jax.parallel import sharding  # noqa: E402

HBM_PER_CHIP = 16 * 2**30  # v5e


def abstract_data(model: Llama, examples: int, prefix: int, batch: int, tail: int,
                  steps: int = 300) -> descent.DescentData:
  c = model.config
  s = jax.ShapeDtypeStruct
  # Packed (classifier.prefix.pack_left_padded): every example's tokens, and a width of slots no
  # example owns per data shard (8 of them, so that any data size up to 8 divides the axis).
  kv = s((c.num_layers, (examples + 8) * prefix, c.num_kv_heads, c.head_dim), model.dtype)
  # The per-example priors are averaged and dropped when the pool is built (engine.pool).
  caches = PrefixCaches(k=kv, v=kv, valid=s((examples, prefix), jnp.bool_),
                        start=s((examples,), jnp.int32), log_prior=None)
  return descent.DescentData(
      params=abstract_params(model), caches=caches, targets=s((examples,), jnp.float32),
      schedule=s((steps, batch), jnp.int32), tail_ids=s((tail,), jnp.int32),
      answer_ids=s((2,), jnp.int32), allowed=s((c.vocab_size,), jnp.bool_),
      mean_log_prior=s((c.vocab_size,), jnp.float32))


def shard_bytes(tree, shardings) -> int:
  """Bytes one device holds of ``tree`` (every device holds the same amount here)."""
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  return sum(int(np.prod(sh.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
             for x, sh in zip(leaves, shards, strict=True))


def activation_bytes(model: Llama, data: descent.DescentData, mesh, state) -> int:
  """XLA's scratch for one step of the float32 twin of ``model`` (see the module docstring)."""
  f32 = Llama(model.config, dtype=jnp.float32, param_dtype=jnp.float32)
  as_f32 = lambda x: (jax.ShapeDtypeStruct(x.shape, jnp.float32)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x)
  data = data.replace(params=jax.tree.map(as_f32, data.params),
                      caches=jax.tree.map(as_f32, data.caches))
  # The engine's step over one label row: a leading row axis on the schedule, prior and state.
  lead = lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype)
  data = data.replace(schedule=lead(data.schedule), mean_log_prior=lead(data.mean_log_prior))
  sh = sharding.data_shardings(data, mesh)
  objective = Objective(f32, LossWeights(1.0, 0.1, 100, 0.02), full_vocab_answer=True)
  optimizer = optax.adam(0.1)
  step = rows.make_rows_step(objective, optimizer, 0.1, mesh, data)
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  replicated = lambda x: with_sharding(x, sharding.replicated(mesh))
  label = jax.tree.map(lead, state['label'])
  state = jax.eval_shape(jax.vmap(lambda lab: descent.init_state(
      lab, optax.chain(optimizer, optax.scale(1.0)))), label)
  state = jax.tree.map(replicated, state)
  hp = {k: replicated(jax.ShapeDtypeStruct((1,), jnp.float32)) for k in rows.HYPERPARAMETERS}
  active = replicated(jax.ShapeDtypeStruct((1,), bool))
  compiled = step.lower(state, jax.tree.map(with_sharding, data, sh), hp, active).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def row(model: Llama, data: descent.DescentData, data_size: int, model_size: int,
        compile_step: bool) -> dict:
  mesh = sharding.make_mesh(data=data_size, model=model_size)
  sh = sharding.data_shardings(data, mesh)
  out = {'mesh': f'{data_size}x{model_size}',
         'weights': shard_bytes(data.params, sh.params),
         'caches': shard_bytes((data.caches.k, data.caches.v, data.caches.valid,
                                data.caches.start),
                               (sh.caches.k, sh.caches.v, sh.caches.valid, sh.caches.start)),
         'other': shard_bytes((data.targets, data.schedule, data.tail_ids, data.answer_ids,
                               data.allowed, data.mean_log_prior),
                              (sh.targets, sh.schedule, sh.tail_ids, sh.answer_ids, sh.allowed,
                               sh.mean_log_prior))}
  optimizer = optax.adam(0.1)
  label = {'logits': jax.ShapeDtypeStruct((1, model.config.vocab_size), jnp.float32),
           'answer_bias': jax.ShapeDtypeStruct((), jnp.float32)}
  state = jax.eval_shape(lambda lab: descent.init_state(lab, optimizer), label)
  out['label state'] = shard_bytes(state, jax.tree.map(lambda _: sharding.replicated(mesh),
                                                       state))
  if compile_step:
    out['activations'] = activation_bytes(model, data, mesh, state) // 2
  out['total'] = sum(v for k, v in out.items() if k != 'mesh')
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--examples', type=int, default=512)
  parser.add_argument('--prefix', type=int, default=256)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--tail', type=int, default=3, help='tail tokens after the label slot')
  parser.add_argument('--meshes', default='1x8,2x4,4x2,8x1')
  parser.add_argument('--no-compile', action='store_true', help='skip the activation column')
  args = parser.parse_args()
  model = Llama(PRESETS['llama3-8b'], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  data = abstract_data(model, args.examples, args.prefix, args.batch, args.tail)
  print(f'Llama-3-8B bf16, {args.examples} examples x {args.prefix}-token prefixes, batch '
        f'{args.batch}, {args.tail} tail tokens; per device, GiB ({jax.device_count()} devices)')
  cols = ['weights', 'caches', 'other', 'label state', 'activations', 'total']
  print('| mesh (data x model) | ' + ' | '.join(cols) + ' | fits 16 GiB |')
  print('|' + '---|' * (len(cols) + 2))
  for spec in args.meshes.split(','):
    d, m = map(int, spec.split('x'))
    r = row(model, data, d, m, not args.no_compile)
    cells = [f'{r[c] / 2**30:.3f}' if c in r else '-' for c in cols]
    fits = 'yes' if r['total'] < HBM_PER_CHIP else 'no'
    print(f'| {r["mesh"]} | ' + ' | '.join(cells) + f' | {fits} |', flush=True)


if __name__ == '__main__':
  main()
