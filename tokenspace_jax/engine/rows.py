"""Label rows: what each row of a run descends, and the one step that descends them all.

A run is F features x R rows per feature. A row is one label being learned: its feature, its
restart (restart 0 starts from ``label.init``, the others add Gaussian logits, seeded by
``seed + restart``) and its hyperparameters (a point of ``sweep.grid``). A single run is 1 x 1, a
sweep 1 x R, the batch job F x R; all run the same step.

The step is ``descent.make_step``'s, vmapped over the rows, with each row's learning rate and
loss weights passed in as arrays (so changing them never recompiles), and wrapped in the
data-parallel ``shard_map`` when the mesh has more than one data shard. The frozen weights and
the prefix-cache pool are shared by all rows (broadcast, never copied); a row's schedule names
its own feature's examples.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from tokenspace_jax import config_defaults
from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.classifier.objective import Objective
from tokenspace_jax.engine import descent
from tokenspace_jax.engine.descent import DescentData

HYPERPARAMETERS = ('lr', 'w_label', 'w_entropy', 'w_kl')

# What varies per row in DescentData; the rest (weights, caches, targets) is shared.
PER_ROW = ('schedule', 'mean_log_prior')
ROW_AXES = DescentData(**{f.name: 0 if f.name in PER_ROW else None
                          for f in dataclasses.fields(DescentData)})


@dataclasses.dataclass(frozen=True)
class RowSpec:
  feature: int  # index of the row's feature in the run's list of features
  restart: int
  lr: float
  w_label: float
  w_entropy: float
  w_kl: float

  def hyperparameters(self) -> dict:
    return {k: getattr(self, k) for k in HYPERPARAMETERS}


def row_specs(config: ConfigDict, num_features: int) -> list[RowSpec]:
  """Every feature's rows, feature-major: the grid points of ``sweep.grid`` x the restarts."""
  grid = config_defaults.parse_grid(config.sweep.grid)
  base = {'lr': config.optim.lr, 'w_label': config.loss.w_label,
          'w_entropy': config.loss.w_entropy, 'w_kl': config.loss.w_kl}
  points = [{**base, **{config_defaults.GRID_KEYS[k]: v for k, v in zip(grid, values,
                                                                         strict=True)}}
            for values in itertools.product(*grid.values())]
  return [RowSpec(feature=f, restart=r, **point) for f in range(num_features) for point in points
          for r in range(config.sweep.restarts)]


def stacked_hyperparameters(specs: list[RowSpec]) -> dict:
  return {k: jnp.asarray([getattr(s, k) for s in specs], jnp.float32) for k in HYPERPARAMETERS}


def init_rows(config: ConfigDict, specs: list[RowSpec], mean_log_priors: np.ndarray,
              vocab_size: int, word_id: int | None,
              optimizer: optax.GradientTransformation) -> dict:
  """The stacked initial state of every row (leaves with a leading row axis)."""
  labels = []
  for spec in specs:
    label = label_lib.init_label(config.label, vocab_size, jax.random.PRNGKey(config.seed),
                                 prior_logits=np.asarray(mean_log_priors[spec.feature]),
                                 word_id=word_id)
    if spec.restart > 0:
      key = jax.random.PRNGKey(config.seed + spec.restart)
      label['logits'] = label['logits'] + config.sweep.noise * jax.random.normal(
          key, label['logits'].shape)
    labels.append(label)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *labels)
  return jax.vmap(lambda label: descent.init_state(label, _scaled(optimizer, 1.0)))(stacked)


def _scaled(optimizer: optax.GradientTransformation, factor) -> optax.GradientTransformation:
  # Adam's and AdamW's updates are proportional to the learning rate, so a row's rate scales
  # the update of the configured one exactly (a schedule keeps its shape).
  return optax.chain(optimizer, optax.scale(factor))


def make_rows_step(objective: Objective, optimizer: optax.GradientTransformation, base_lr: float,
                   mesh: jax.sharding.Mesh | None = None, data: DescentData | None = None,
                   top_k: int = 5, candidates: int = 0):
  """``step(state, data, hp, active) -> (state, metrics)``, jitted, the state donated.

  ``state`` is ``init_rows``'s; ``data`` a ``DescentData`` whose ``schedule`` is [N, steps,
  batch] and ``mean_log_prior`` [N, V]; ``hp`` holds [N] arrays ``HYPERPARAMETERS``. Rows that
  are not ``active``, or whose loss or update is not finite (their metrics say ``ok=False``),
  are left exactly as they were. Metrics have a leading [N] axis.

  On a mesh with more than one device, ``data`` (arrays or shape structs) must be given: the
  data-parallel wrapper fits its partition specs to it. ``candidates`` > 0 adds each row's
  ``settled`` metric (``descent.make_step``).
  """

  def rows(objective):
    def row(state, data, hp):
      weights = dataclasses.replace(objective.weights, label=hp['w_label'],
                                    entropy=hp['w_entropy'], kl=hp['w_kl'])
      step = descent.make_step(objective.with_weights(weights),
                               _scaled(optimizer, hp['lr'] / base_lr), top_k, candidates)
      return step.__wrapped__(state, data)

    def step(state, data, hp, active):
      new, metrics = jax.vmap(row, in_axes=(0, ROW_AXES, 0))(state, data, hp)
      keep = active & metrics['ok']
      select = lambda a, b: jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 1)), a, b)
      return jax.tree.map(select, new, state), metrics
    return step

  if mesh is None or mesh.size == 1:
    return jax.jit(rows(objective), donate_argnums=(0,))
  from tokenspace_jax.parallel import sharded_step
  return sharded_step.make_sharded_rows_step(rows, objective, mesh, data)
