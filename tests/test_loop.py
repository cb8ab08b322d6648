"""The loop steps only the rows that still run, and ends where stepping every row would."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenspace_jax.engine import loop
from tokenspace_jax.outputs.checkpoint import StopFlag

STOPS = np.array([9, 2, 5, 3, 12])  # the step at which each row becomes confident


class NoCheckpoints:
  def __init__(self):
    self.saved = []

  def save(self, t, state, force=False):
    if force:
      self.saved.append((t, state() if callable(state) else state))
    return False


def _state():
  n = len(STOPS)
  return loop.initial_state({'x': jnp.zeros((n, 3)), 'step': jnp.zeros(n, jnp.int32)})


def _step(shapes):
  """A row's step: x grows by its own rate (data), its confidence reaches 1 at its STOPS."""
  @jax.jit
  def step(rows, data, hp, active):
    new = {'x': rows['x'] + data['rate'][:, None] * hp['lr'][:, None],
           'step': rows['step'] + 1}
    keep = active[:, None]
    new = {'x': jnp.where(keep, new['x'], rows['x']),
           'step': jnp.where(active, new['step'], rows['step'])}
    p = (new['step'] / data['stop']).astype(jnp.float32)[:, None]
    n = rows['step'].shape[0]
    return new, {'ok': jnp.ones(n, bool), 'loss': new['x'].sum(-1), 'label_p': p}

  def counted(rows, data, hp, active):
    shapes.append(rows['step'].shape[0])
    return step(rows, data, hp, active)
  return counted


DATA = {'rate': jnp.arange(1.0, 6.0), 'stop': jnp.asarray(STOPS, jnp.float32)}
HP = {'lr': jnp.full(5, 0.5)}


def _select(rows, idx):
  take = lambda tree: jax.tree.map(lambda x: x[jnp.asarray(idx)], tree)
  return take(rows), take(DATA), take(HP)


def _descend(state, shapes, steps=30, select=_select):
  return loop.descend(_step(shapes), state, DATA, HP, steps=steps, early_stop_prob=1.0,
                      patience=1, ckpt=NoCheckpoints(), stop=StopFlag(), select=select)


def test_live_rows_are_the_running_rows_padded_to_a_power_of_two():
  R, S = loop.RUNNING, loop.STOPPED_EARLY
  assert loop.live_rows(np.array([R, R, R, R, R])).tolist() == [0, 1, 2, 3, 4]
  assert loop.live_rows(np.array([S, R, R, R, R])).tolist() == [1, 2, 3, 4]
  assert loop.live_rows(np.array([S, S, R, R, R])).tolist() == [0, 2, 3, 4]
  assert loop.live_rows(np.array([S, S, S, R, R])).tolist() == [3, 4]
  assert loop.live_rows(np.array([S, R, S, S, S])).tolist() == [1]


def test_stopped_rows_stop_costing_steps_and_the_end_is_the_same():
  everyone, fewer = [], []
  full = _descend(_state(), everyone, select=None)
  live = _descend(_state(), fewer)
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(live.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.asarray(live.state['rows']['step']).tolist() == STOPS.tolist()
  assert everyone == [5] * 12
  # 5 rows until row 1 stops (step 2), 4 (one of them stopped) until row 2 has (step 5), then
  # 2 until row 0 has (step 9), then 1.
  assert fewer == [5] * 2 + [4] * 3 + [2] * 4 + [1] * 3
  assert sum(fewer) < sum(everyone)


@pytest.mark.parametrize('cut', [1, 3, 4, 7, 10])
def test_a_resumed_run_steps_with_the_same_shapes(cut):
  """The rows stepped are a function of the status alone: stopped at step ``cut`` and resumed
  from its state, the run steps the shapes an uninterrupted one does, to the same end."""
  straight = []
  whole = _descend(_state(), straight)
  first, second = [], []
  part = _descend(_state(), first, steps=cut)
  rest = _descend(part.state, second)
  assert first + second == straight
  for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(rest.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SETTLES = np.array([4, 1, 3, 7, 2])  # the step from which each row's candidates stop changing


def _settling_step():
  """A row's step that never gets confident; its candidate set is unchanged from SETTLES on,
  except at step 6 for row 2 (a new token entered), which must restart that row's count."""
  @jax.jit
  def step(rows, data, hp, active):
    new_step = jnp.where(active, rows['step'] + 1, rows['step'])
    settled = (new_step > data['settle']) & ~((new_step == 6) & (data['row'] == 2))
    n = rows['step'].shape[0]
    return ({'x': rows['x'], 'step': new_step},
            {'ok': jnp.ones(n, bool), 'loss': jnp.zeros(n), 'settled': settled,
             'label_p': jnp.zeros((n, 1))})
  return step


def _settle(state, steps=40, patience=3):
  data = {'settle': jnp.asarray(SETTLES), 'row': jnp.arange(5)}
  take = lambda tree, idx: jax.tree.map(lambda x: x[jnp.asarray(idx)], tree)
  select = lambda rows, idx: (take(rows, idx), take(data, idx), take(HP, idx))
  return loop.descend(_settling_step(), state, data, HP, steps=steps, early_stop_prob=0.0,
                      patience=1, settle_patience=patience, ckpt=NoCheckpoints(),
                      stop=StopFlag(), select=select)


def test_a_row_whose_candidates_stay_the_same_stops_settled():
  result = _settle(_state())
  assert result.status.tolist() == [loop.SETTLED] * 5
  # Settled from step SETTLES + 1 on, stopped after 3 such steps; row 2's count (steps 4, 5)
  # restarted at 6, so it stops after steps 7, 8, 9.
  expected = SETTLES + 3
  expected[2] = 9
  assert np.asarray(result.state['rows']['step']).tolist() == expected.tolist()
  # Disabled (patience 0), nothing stops before the last step.
  off = _settle(_state(), steps=12, patience=0)
  assert off.status.tolist() == [loop.RUNNING] * 5
  assert np.asarray(off.state['rows']['step']).tolist() == [12] * 5


@pytest.mark.parametrize('cut', [2, 5, 7])
def test_a_resumed_run_keeps_its_settled_count(cut):
  whole = _settle(_state())
  rest = _settle(_settle(_state(), steps=cut).state)
  for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(rest.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
