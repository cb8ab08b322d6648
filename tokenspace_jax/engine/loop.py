"""The one descent loop: every label row of a run, stepped until each has stopped.

A row is running, stopped early (its label's weakest position held ``early_stop.prob`` for
``early_stop.patience`` steps), settled (the final choice's candidates, the most probable tokens,
stayed the same set for ``early_stop.settled`` steps), or non-finite (its loss or update stopped
being finite: the step kept its last good state, and the row stops there; its record says why).
Rows that stopped are left as they are while the others go on; given ``select``, the step then
runs on a smaller set of rows (``live_rows``), so a row that stopped early stops costing steps.
The whole loop state (the rows, their status and early-stop streaks, the step) is what a
checkpoint holds, so a run killed at any point resumes exactly where it was, an early stop
included.

SIGTERM or Ctrl-C (a preemption) sets a flag; the loop finishes the step in flight, writes a
checkpoint and raises ``RunInterrupted``, and rerunning the same command resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.outputs.checkpoint import Checkpointer, StopFlag

log = logging.getLogger('tokenspace_jax')

RUNNING, STOPPED_EARLY, NON_FINITE, SETTLED = 0, 1, 2, 3
STATUS_NAMES = {RUNNING: 'finished', STOPPED_EARLY: 'stopped early', NON_FINITE: 'non-finite',
                SETTLED: 'settled'}

# Per-row metrics written to the trajectory, beside the step, the label and its top tokens.
TRAJECTORY_TERMS = ('loss', 'answer_ce', 'entropy', 'kl', 'w_entropy', 'batch_accuracy',
                    'answer_bias')


class RunInterrupted(RuntimeError):
  """SIGTERM or Ctrl-C: a checkpoint was written; rerunning the same command resumes."""


class NonFiniteLossError(RuntimeError):
  """Every row's loss became NaN or infinite; the last good states were kept in a checkpoint."""


# Loop-state keys added since the first release: a checkpoint written before may lack them, and
# resumes with their initial value (``Checkpointer.restore(optional=...)``).
ADDED_STATE = ('settled',)


def initial_state(rows: dict) -> dict:
  """The loop state around the stacked row states ``rows`` (leading axis: the rows)."""
  n = rows['step'].shape[0]
  return {'rows': rows, 'status': jnp.full(n, RUNNING, jnp.int32),
          'streak': jnp.zeros(n, jnp.int32), 'settled': jnp.zeros(n, jnp.int32),
          'bad_loss': jnp.zeros(n, jnp.float32), 't': jnp.zeros((), jnp.int32)}


def live_rows(status: np.ndarray) -> np.ndarray:
  """The rows the step runs on, given every row's status: the running rows, padded with the
  first stopped ones to a power of two (at most all rows), so a run of R rows compiles at most
  about log2(R) step shapes. A function of the status alone, so a resumed run steps with the
  same shapes as an uninterrupted one."""
  running = np.flatnonzero(status == RUNNING)
  size = min(len(status), 1 << max(len(running) - 1, 0).bit_length())
  stopped = np.flatnonzero(status != RUNNING)[:size - len(running)]
  return np.sort(np.concatenate([running, stopped]))


@dataclasses.dataclass
class LoopResult:
  state: dict  # the final loop state (host copies of status, streak, bad_loss)
  steps_run: int  # steps taken in this process (not counting those before a resume)
  compile_seconds: float | None  # the first step, with its compilation
  descent_seconds: float

  @property
  def status(self) -> np.ndarray:
    return np.asarray(self.state['status'])


def descend(step_fn, state: dict, data, hp: dict, *, steps: int, early_stop_prob: float,
            patience: int, ckpt: Checkpointer, stop: StopFlag, settle_patience: int = 0,
            trajectory=None, decode: Callable[[tuple], str] | None = None,
            search: Callable | None = None, progress: bool = False,
            name: str = '', select: Callable | None = None) -> LoopResult:
  """Steps ``state`` (``initial_state``'s, or a restored checkpoint of it) to the end.

  ``trajectory`` (``outputs.report.Trajectory``) gets a record per row and step; ``decode``
  turns a tuple of token ids into text for it. ``search(rows, data, hp, active, t)`` runs before
  step ``t`` and returns the rows, changed where it found a better token (``engine.search``).
  ``select(rows, idx)`` returns the rows, data and hyperparameters of rows ``idx`` alone; with
  it the step runs on ``live_rows`` only, and the other rows wait, unchanged, in the full state.
  ``settle_patience`` > 0 (the step must report ``settled``) also stops a row whose candidate set
  has not changed for that many steps.
  """
  from tqdm import tqdm

  status = np.array(state['status'])
  streak = np.array(state['streak'])
  settled = np.array(state['settled'])
  bad_loss = np.array(state['bad_loss'])
  t = int(state['t'])
  n = len(status)
  # The step runs on rows ``live`` of the full state: ``sub`` holds their current state, ``full``
  # every row's as of the last change of ``live`` (the rows outside ``live`` have stopped).
  full, live = state['rows'], np.arange(n)
  sub, sub_data, sub_hp = full, data, hp

  def rows_now():
    if len(live) == n:
      return sub
    return jax.tree.map(lambda f, x: f.at[live].set(x), full, sub)

  def reselect():
    nonlocal full, live, sub, sub_data, sub_hp
    if select is None:
      return
    want = live_rows(status)
    if np.array_equal(want, live):
      return
    full, live = rows_now(), want
    sub, sub_data, sub_hp = ((full, data, hp) if len(live) == n else select(full, live))

  pack = lambda: {'rows': rows_now(), 'status': jnp.asarray(status),
                  'streak': jnp.asarray(streak), 'settled': jnp.asarray(settled),
                  'bad_loss': jnp.asarray(bad_loss),
                  't': jnp.asarray(t, jnp.int32)}
  reselect()  # a resumed run's stopped rows
  records = trajectory.records if trajectory is not None else []
  prior_elapsed = records[-1]['elapsed'] if records else 0.0
  t0, compile_seconds, start = time.perf_counter(), None, t
  with tqdm(total=steps, initial=t, disable=not progress, desc=name or None,
            dynamic_ncols=True) as bar:
    while t < steps and (status == RUNNING).any():
      active = jnp.asarray(status[live] == RUNNING)
      if search is not None:
        sub = search(sub, sub_data, sub_hp, active, t)
      sub, metrics = step_fn(sub, sub_data, sub_hp, active)
      m = _to_all_rows(jax.device_get(metrics), live, n)
      if compile_seconds is None:
        compile_seconds = time.perf_counter() - t0
      running = status == RUNNING
      failed = running & ~m['ok']
      bad_loss[failed] = m['loss'][failed]
      confidence = m['label_p'].min(axis=-1)
      streak = np.where(running & m['ok'] & (confidence >= early_stop_prob), streak + 1, 0)
      status[failed] = NON_FINITE
      if early_stop_prob > 0:
        status[running & m['ok'] & (streak >= patience)] = STOPPED_EARLY
      if settle_patience > 0:
        settled = np.where(running & m['settled'], settled + 1, 0)
        status[running & m['ok'] & (status == RUNNING) & (settled >= settle_patience)] = SETTLED
      if failed.any():
        log.warning('%sRows %s: the loss became non-finite at step %d; they stop there, at '
                    'their last good state.', f'{name}: ' if name else '',
                    np.flatnonzero(failed).tolist(), t + 1)
      t += 1
      reselect()
      if trajectory is not None:
        elapsed = prior_elapsed + time.perf_counter() - t0
        for r in np.flatnonzero(running & m['ok']):
          trajectory.append(_record(m, r, t, elapsed, decode))
      bar.update(1)
      if trajectory is not None and len(status) == 1 and running[0] and m['ok'][0]:
        last = trajectory.records[-1]
        bar.set_postfix_str(f'loss {last["loss"]:.3f} label {last["label"]!r} '
                            f'p={min(last["label_p"]):.2f}')
      if ckpt.save(t, pack) and trajectory is not None:
        trajectory.sync()  # the trajectory on disk reaches at least the checkpoint
      if stop:
        ckpt.save(t, pack(), force=True)
        raise RunInterrupted(f'{stop.signal_name} received: stopped after step {t} with a '
                             'checkpoint. Rerun the same command to resume.')
  ckpt.save(t, pack(), force=True)  # the final state, for a kill while results are written
  return LoopResult(state=pack(), steps_run=t - start, compile_seconds=compile_seconds,
                    descent_seconds=time.perf_counter() - t0)


def _to_all_rows(m: dict, live: np.ndarray, n: int) -> dict:
  """Metrics of rows ``live`` spread over all ``n`` rows (the others: zeros, ``ok`` False)."""
  if len(live) == n:
    return m
  def spread(x):
    out = np.zeros((n, *x.shape[1:]), x.dtype)
    out[live] = x
    return out
  return {k: spread(np.asarray(v)) for k, v in m.items()}


def _record(m: dict, r: int, step: int, elapsed: float, decode) -> dict:
  decode = decode or (lambda ids: ' '.join(map(str, ids)))
  record = {'step': step, 'row': int(r)}
  record.update({k: float(m[k][r]) for k in TRAJECTORY_TERMS})
  record['top'] = [[decode((int(i),)), float(p)] for i, p in zip(m['top_ids'][r], m['top_p'][r],
                                                                   strict=True)]
  record['label'] = decode(tuple(int(i) for i in m['label_ids'][r]))
  record['label_p'] = [float(p) for p in m['label_p'][r]]
  record['elapsed'] = elapsed
  return record
