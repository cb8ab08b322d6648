"""Many labels descended in one jitted step: the single-label step, vmapped over label rows.

A step on a small model leaves an accelerator mostly idle; stacking the labels of several
features (or several restarts of one feature) on a leading row axis fills it. Each row is
exactly the computation of ``descent.make_step`` (the same function, vmapped), with its own
label, Adam moments, step counter, schedule row and prior, so a row ends where a run of that
label alone would. The frozen weights, the prefix-cache pool and the targets are shared by all
rows (broadcast, not copied): a row's schedule holds indices into the pool.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from tokenspace_jax.classifier.objective import Objective
from tokenspace_jax.engine import descent

# What varies per row in DescentData; everything else is broadcast (None in vmap's in_axes marks
# a whole subtree, such as the weights or the caches, as shared).
PER_ROW = ('schedule', 'mean_log_prior')
_ROW_AXES = descent.DescentData(**{f.name: 0 if f.name in PER_ROW else None
                                   for f in dataclasses.fields(descent.DescentData)})


def init_stacked_state(labels: dict, optimizer: optax.GradientTransformation) -> dict:
  """``descent.init_state`` of every row of ``labels`` (leaves stacked on axis 0)."""
  return jax.vmap(lambda label: descent.init_state(label, optimizer))(labels)


def stack(trees: list) -> dict:
  """Pytrees with the same structure, stacked on a new leading row axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def make_stacked_step(objective: Objective, optimizer: optax.GradientTransformation,
                      top_k: int = 5):
  """``step(state, data, active) -> (state, metrics)``, jitted with the state donated.

  ``state`` is ``init_stacked_state``'s: every leaf has a leading row axis [R]. ``data`` is a
  ``DescentData`` whose ``schedule`` is [R, steps, batch] and ``mean_log_prior`` [R, V]; its
  other fields are shared. ``active`` [R] bool: rows that are False (finished, or failed) are
  left exactly as they are, as is a row whose loss or update is not finite (its metrics say
  ``ok=False``), so one bad row never disturbs the others. Metrics have a leading [R] axis.
  """
  # Calling the jitted single-label step inside this trace inlines it (donation applies only to
  # the outer call), so the row computation is the single run's, not a copy of it.
  row_step = jax.vmap(descent.make_step(objective, optimizer, top_k), in_axes=(0, _ROW_AXES))

  def step(state, data: descent.DescentData, active: jax.Array):
    new, metrics = row_step(state, data)
    keep = active & metrics['ok']
    select = lambda a, b: jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(select, new, state), metrics

  return jax.jit(step, donate_argnums=(0,))
