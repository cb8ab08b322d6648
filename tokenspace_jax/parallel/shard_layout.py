"""How examples and batches are split across the ``data`` axis of the mesh.

A ``NamedSharding`` splits the example axis into contiguous blocks: device ``j`` along ``data``
holds slots ``[j * n_local, (j + 1) * n_local)``. Data parallelism without moving prefix caches
between devices needs every batch to take the same number of examples from each block, and each
block to hold its share of the positives and negatives to draw them from. So:

* ``layout_examples`` deals each stratum of examples (per feature of the pool: train positives,
  train negatives, held-out examples) to the blocks in turn, keeping their order within a block,
  and pads every block to one size with copies that no batch draws;
* ``shard_schedule`` draws each block's part of every batch of one feature from that feature's
  train examples in the block, with the engine's one sampler (``engine.sampler``), and lays the
  parts side by side: a [steps, batch] schedule of *local* slots, column block ``j`` for device
  ``j``.

With one block the layout is the identity and the schedule is the sampler's own over the pool's
slots. ``to_global`` turns a local schedule into global slots.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tokenspace_jax.engine.sampler import batch_schedule


class LayoutError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class ExampleLayout:
  data: int  # number of blocks (devices along the data axis)
  n_local: int  # slots per block
  order: np.ndarray  # [data * n_local] example stored in each slot
  padding: np.ndarray  # [data * n_local] bool: a copy that no batch draws
  train: np.ndarray  # [examples] bool: a training example (drawn by batches)
  groups: np.ndarray  # [examples] the feature of each example

  @property
  def slots(self) -> int:
    return self.data * self.n_local

  def slot_of(self) -> np.ndarray:
    """[examples] the slot holding each example (for evaluation by example index)."""
    where = np.empty(int(self.order[~self.padding].max()) + 1, np.int64)
    real = np.flatnonzero(~self.padding)
    where[self.order[real]] = real
    return where

  def arrange(self, x: np.ndarray, axis: int = 0) -> np.ndarray:
    """``x`` indexed by example, reordered (and padded) into slots along ``axis``."""
    return np.take(np.asarray(x), self.order, axis=axis)


def layout_examples(targets: np.ndarray, train: np.ndarray, data: int,
                    groups: np.ndarray | None = None, n_local: int = 0) -> ExampleLayout:
  """Deals examples to ``data`` blocks, each stratum round robin.

  ``train`` [examples] marks training examples; ``groups`` [examples] the feature each belongs
  to (default: one feature). The strata are, per feature, train positives, train negatives and
  held-out examples; every block holds an equal share (to within one) of each, in the examples'
  order. ``n_local`` pads each block to that many slots (so pools of different sizes share one
  shape); by default blocks take the size of the largest.
  """
  targets = np.asarray(targets)
  train = np.asarray(train, bool)
  groups = np.zeros(len(targets), np.int64) if groups is None else np.asarray(groups, np.int64)
  kind = groups * 3 + np.where(~train, 2, (targets <= 0.5).astype(np.int64))
  # Each stratum continues the rotation where the previous one stopped, so blocks differ in size
  # by at most one example.
  counts = np.bincount(kind, minlength=int(kind.max()) + 1 if len(kind) else 1)
  dealt = np.concatenate([[0], np.cumsum(counts)[:-1]])
  blocks: list[list[int]] = [[] for _ in range(data)]
  for e, k in enumerate(kind):
    blocks[dealt[k] % data].append(e)
    dealt[k] += 1
  longest = max(len(b) for b in blocks)
  if n_local and n_local < longest:
    raise LayoutError(f'{len(targets)} examples do not fit {data} blocks of {n_local} slots.')
  n_local = n_local or longest
  order, padding = [], []
  for b in blocks:
    if not b:
      raise LayoutError(f'{len(targets)} examples cannot fill {data} data shards.')
    order += b + [b[-1]] * (n_local - len(b))
    padding += [False] * len(b) + [True] * (n_local - len(b))
  return ExampleLayout(data=data, n_local=n_local, order=np.asarray(order, np.int64),
                       padding=np.asarray(padding), train=train, groups=groups)


def shard_schedule(layout: ExampleLayout, targets: np.ndarray, steps: int, batch_size: int,
                   positive_fraction: float | None, seed: int, group: int = 0) -> np.ndarray:
  """[steps, batch] local slots of feature ``group``: column block ``j`` from block ``j``.

  Block ``j`` draws ``batch_size / data`` examples a step with the sampler and seed ``seed + j``
  (so one block draws what a run without a mesh draws). The positive share is rounded per block.
  """
  if batch_size % layout.data:
    raise LayoutError(f'data.batch_size={batch_size} is not a multiple of the {layout.data} '
                      'data shards: each device takes an equal share of a batch.')
  local = batch_size // layout.data
  needs_both = positive_fraction is not None and 0 < round(local * positive_fraction) < local
  if positive_fraction is not None and not needs_both:
    raise LayoutError(f'Each of the {layout.data} data shards takes {local} examples of a '
                      f'batch of {batch_size}: too few to hold positives and negatives at '
                      f'positive_fraction={positive_fraction}. Use a larger data.batch_size or '
                      'fewer data shards (mesh.data).')
  targets = np.asarray(targets)
  parts = []
  for j in range(layout.data):
    slots = np.arange(j * layout.n_local, (j + 1) * layout.n_local)
    examples = layout.order[slots]
    drawn = (~layout.padding[slots] & layout.train[examples]
             & (layout.groups[examples] == group))
    train = slots[drawn]
    positive = targets[layout.order[train]] > 0.5
    pos, neg = train[positive] - j * layout.n_local, train[~positive] - j * layout.n_local
    if len(train) == 0 or (needs_both and (len(pos) == 0 or len(neg) == 0)):
      raise LayoutError(f'Data shard {j} holds {len(pos)} train positives and {len(neg)} '
                        f'negatives: too few to draw its share of a batch. Use fewer data shards '
                        'or more examples.')
    parts.append(batch_schedule(pos, neg, steps, local, positive_fraction, seed + j))
  return np.concatenate(parts, axis=1).astype(np.int32)


def to_global(schedule: np.ndarray, layout: ExampleLayout) -> np.ndarray:
  """A local-slot schedule ([..., batch]) as global slots (column block ``j`` offset by its
  block)."""
  batch = schedule.shape[-1]
  block = np.repeat(np.arange(layout.data), batch // layout.data)
  return (schedule + block * layout.n_local).astype(np.int32)
