"""The descent step, data parallel over a device mesh: ``pmap``'s model written as ``shard_map``.

Each device along ``data`` runs the very step of ``descent.make_step`` on its own share: the
local slots of its columns of the schedule, its block of prefix caches and targets. Only the
loss is wrapped, in a ``pmean`` over ``data``; differentiating that mean makes autodiff
all-reduce the label gradient (the transpose of using the replicated label on per-device data is
a ``psum``), so every device applies the same update to its replica of the label and optimizer
state, and the loss terms it reports are the whole batch's. Shares are equal, so the mean of the
per-device means is the batch mean: on one device the step is ``descent.make_step``'s.

Only ``data`` is manual. ``model`` stays with the compiler, which follows the placement of the
weights and caches (``sharding.py``) and inserts the tensor-parallel collectives, so the model
code has none. With one device along ``data`` there is nothing to all-reduce, and the step is
``descent.make_step``'s own, jitted over the mesh. The state is donated, as in the
single-device step.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tokenspace_jax.classifier.objective import Objective
from tokenspace_jax.engine.descent import DescentData
from tokenspace_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class MeanOverAxis:
  """An objective whose loss and terms are averaged over a mesh axis; otherwise the same."""

  objective: Objective
  axis: str

  def __call__(self, label, params, *args):
    # The replicated label meets per-device caches inside the layer scan, whose carry must have
    # one type throughout: mark it per-device from the start. The transpose of this cast is the
    # psum that all-reduces the gradient. The weights are cast too (a no-op in the program):
    # cast inside the scan instead, each layer's weights would be a new value that the backward
    # pass saves, a full copy of the model, rather than a slice of the input it can reread.
    label, params = jax.lax.pcast((label, params), self.axis, to='varying')
    return jax.lax.pmean(self.objective(label, params, *args), self.axis)

  def with_weights(self, weights) -> MeanOverAxis:
    return MeanOverAxis(self.objective.with_weights(weights), self.axis)

  def __getattr__(self, name):  # learn_answer_bias, log_p, ...
    if name == 'objective':  # not yet set (copy, unpickling): no recursion
      raise AttributeError(name)
    return getattr(self.objective, name)


def make_sharded_rows_step(rows, objective: Objective, mesh: Mesh, data: DescentData):
  """The label-rows step of ``engine.rows`` over ``mesh``, for data placed with
  ``sharding.data_shardings``.

  ``rows(objective)`` builds the unjitted ``step(state, data, hp, active)``; here it is built on
  the mean-over-``data`` objective and run under ``shard_map``, manual over ``data`` only.
  ``data`` (arrays or ``jax.ShapeDtypeStruct``s) gives the tree structure and shapes the specs
  are fitted to; its schedule holds local slots (``shard_layout.shard_schedule``). The state,
  the hyperparameters, the active mask and the metrics are replicated; put the state on the
  mesh with ``sharding.replicated(mesh)``.
  """
  specs = sharding.data_specs(data, mesh)  # checks that the batch and examples divide evenly
  if mesh.shape[sharding.DATA] == 1:
    # One data shard: the plain step, the model axis left to the compiler. (A shard_map manual
    # over a size-1 axis with another axis auto makes XLA 0.10's partitioner reject the
    # all-reduce: "Cross-partition allreduce must be in (partial) manual partitioning mode".)
    fn = rows(objective)
  else:
    fn = jax.shard_map(rows(MeanOverAxis(objective, sharding.DATA)), mesh=mesh,
                       in_specs=(P(), sharding.data_axis_specs(specs), P(), P()), out_specs=P(),
                       axis_names={sharding.DATA})
  # Pinned: left to the compiler, the outputs may come back split along ``model`` (the label's
  # vocabulary axis, like the embedding's), and the next call would compile again.
  return jax.jit(fn, donate_argnums=(0,), out_shardings=sharding.replicated(mesh))
