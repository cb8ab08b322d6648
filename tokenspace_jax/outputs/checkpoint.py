"""Verified Orbax checkpoints of the descent state, and a stop flag raised by SIGTERM / Ctrl-C.

Preemptible machines send SIGTERM and give a few seconds; the handler only sets a flag, the loop
finishes the step in flight, writes a checkpoint and exits, so a rerun of the same command
resumes exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp

from tokenspace_jax.outputs import storage

log = logging.getLogger('tokenspace_jax')

CHECKSUMS = 'checksums'  # beside the step folders; Orbax ignores names that are not steps
SET_ASIDE = 'set_aside'


class Checkpointer:
  """Orbax checkpoints of a state, each verified on restore against checksums of its arrays.

  Orbax restores a checkpoint whose array bytes were damaged without a word, and fails on a
  truncated one with a long traceback, leaving the intact older step untried. So each save first
  writes the sha256 of every leaf to ``checksums/STEP.json`` (durably, before Orbax starts, so a
  finished step never lacks its checksums), and ``restore`` takes the newest step that both
  reads and matches, warning about each one skipped; skipped steps are moved to ``set_aside/``
  (not deleted), as Orbax would otherwise refuse to save those steps again. A full disk or a
  read-only directory is one :class:`storage.StorageError` line.
  """

  def __init__(self, directory: str, every: int, keep: int = 2):
    self.directory = os.path.abspath(directory)  # orbax refuses relative paths
    _install_fault_filter()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(1, every),
                                           create=True)
    with storage.translated(self.directory):
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._writer = jax.process_index() == 0
    self._last_bytes = None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state, optional: tuple[str, ...] = ()):
    """The newest intact checkpoint (shaped like ``abstract_state``), or None if there is none.

    ``optional`` names top-level keys of a dict state that a checkpoint written by an earlier
    version may lack (a counter added since): such a checkpoint is restored without them, and
    they keep their value in ``abstract_state``, so upgrading mid-run loses no steps.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    older = ({k: v for k, v in target.items() if k not in optional}
             if optional and isinstance(target, dict) else None)
    skipped = []
    for step in steps:
      restored, why = self._restore_step(step, target)
      if why is not None and older is not None:
        partial, partial_why = self._restore_step(step, older)
        if partial_why is None:
          restored, why = {**abstract_state, **partial}, None
      if why is None:
        self._set_aside(skipped)
        return restored
      log.warning('Checkpoint step %d in %s is skipped: %s.', step, self.directory, why)
      skipped.append(step)
    log.warning('No intact checkpoint in %s (steps %s skipped); the run starts over from its '
                'beginning.', self.directory, ', '.join(map(str, skipped)))
    self._set_aside(skipped)
    return None

  def _restore_step(self, step: int, target):
    """(the state of ``step``, None), or (None, why it cannot be used)."""
    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # Orbax and Tensorstore raise many types for a damaged file
      if _not_damage(e):
        raise
      return None, f'it cannot be read ({_first_line(e)})'
    why = self._verify(step, restored)
    return (restored, None) if why is None else (None, why)

  def save(self, step: int, state, force: bool = False) -> bool:
    """Saves ``state`` (or what ``state()`` returns, built only when a save is due)."""
    if step in self._manager.all_steps():
      return False  # already on disk (a forced save right after a periodic one)
    if not force and not self._manager.should_save(step):
      return False
    if callable(state):
      state = state()
    needed = sum(int(getattr(leaf, 'nbytes', 0)) for leaf in jax.tree.leaves(state))
    try:
      with storage.translated(self.directory, needed):
        storage.check_writable(self.directory)  # before Orbax, which fails in its threads
        if self._writer:
          os.makedirs(self._sums_path(), exist_ok=True)
          storage.write_json(self._sums_path(step), {'step': step, 'leaves': checksums(state)},
                             indent=None)
        saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except storage.DiskFullError as e:  # the message names what the whole checkpoint needs
      raise storage.storage_error(e, self.directory, needed) from e
    self._last_bytes = needed  # for a fault of this save reported later (Orbax saves async)
    self._prune(keep={step})
    return bool(saved)

  def close(self):
    try:
      with storage.translated(self.directory, self._last_bytes):
        self._manager.wait_until_finished()
    finally:
      with storage.translated(self.directory, self._last_bytes):
        self._manager.close()
    self._prune()

  # --- checksums

  def _sums_path(self, step: int | None = None) -> str:
    base = os.path.join(self.directory, CHECKSUMS)
    return base if step is None else os.path.join(base, f'{step}.json')

  def _summed_steps(self) -> list[int]:
    names = glob.glob(os.path.join(glob.escape(self._sums_path()), '*.json'))
    stems = (os.path.basename(n)[:-len('.json')] for n in names)
    return sorted(int(s) for s in stems if s.isdigit())

  def _verify(self, step: int, restored) -> str | None:
    """Why the restored ``step`` is not what was saved, or None if it is."""
    path = self._sums_path(step)
    try:
      with open(path) as f:
        expected = json.load(f)['leaves']
    except FileNotFoundError:
      if any(s <= step for s in self._summed_steps()):
        return f'its checksum file {path} is missing'
      log.info('Checkpoint step %d in %s predates checksums; restored unverified.', step,
               self.directory)
      return None
    except (OSError, ValueError, KeyError, TypeError) as e:
      return f'its checksum file {path} cannot be read ({_first_line(e)})'
    actual = checksums(restored, dtypes={k: v.get('dtype') for k, v in expected.items()})
    bad = [k for k, v in expected.items()
           if v.get('sha256') is not None and k in actual and actual[k].get('sha256') is not None
           and (actual[k]['sha256'], actual[k]['shape']) != (v['sha256'], v['shape'])]
    bad += [k for k in expected if k not in actual]
    if bad:
      return (f'its arrays differ from the checksums saved with them ({", ".join(bad[:3])}'
              f'{" ..." if len(bad) > 3 else ""}): the files are damaged')
    return None

  def _prune(self, keep=()):
    """Drops the checksum files of steps Orbax removed (or never finished)."""
    if not self._writer:
      return
    live = set(self._manager.all_steps()) | set(keep)
    for step in self._summed_steps():
      if step not in live:
        with contextlib.suppress(OSError):
          os.remove(self._sums_path(step))

  def _set_aside(self, steps):
    """Moves skipped steps out of Orbax's sight, so the run can save those steps anew."""
    if not steps:
      return
    if self._writer:
      aside = os.path.join(self.directory, SET_ASIDE)
      for step in steps:
        try:
          os.makedirs(aside, exist_ok=True)
          target = os.path.join(aside, str(step))
          n = 1
          while os.path.exists(target):
            target, n = os.path.join(aside, f'{step}.{n}'), n + 1
          os.rename(os.path.join(self.directory, str(step)), target)
          if os.path.exists(self._sums_path(step)):
            os.rename(self._sums_path(step), target + '.checksums.json')
          log.warning('Checkpoint step %d moved to %s.', step, target)
        except OSError as e:
          log.warning('Checkpoint step %d could not be set aside (%s).', step, e)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices('tokenspace_jax checkpoint set aside')
    self._manager.reload()


def _host_array(x, dtype: str | None = None) -> np.ndarray | None:
  """The bytes of a leaf as a numpy array, or None where this process cannot see them whole."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      if not x.is_fully_replicated:
        return None
      x = x.addressable_data(0)
  a = np.asarray(x)
  if dtype is not None and str(a.dtype) != dtype:
    with contextlib.suppress(TypeError, ValueError):
      a = a.astype(dtype)  # e.g. a Python int saved, an int32 restored
  return np.ascontiguousarray(a)


def checksums(state, dtypes: dict | None = None) -> dict:
  """{leaf path: dtype, shape, nbytes and sha256 of its bytes} of a state tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path)
    a = _host_array(leaf, (dtypes or {}).get(key))
    if a is None:
      out[key] = {'dtype': None, 'shape': None, 'nbytes': 0, 'sha256': None}
      continue
    digest = hashlib.sha256(a.tobytes()).hexdigest()
    out[key] = {'dtype': str(a.dtype), 'shape': list(a.shape), 'nbytes': int(a.nbytes),
                'sha256': digest}
  return out


def _not_damage(e: BaseException) -> bool:
  """Whether a failed restore says nothing about the files (out of device or host memory)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (MemoryError, jax.errors.JaxRuntimeError)):
      return True
    e = e.__cause__ or e.__context__
  return False


def _first_line(e: BaseException) -> str:
  """The first line of the innermost cause: Orbax wraps Tensorstore's precise message."""
  seen = set()
  while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  text = str(e).strip().split('\n')[0] or type(e).__name__
  return text if len(text) <= 200 else text[:197] + '...'


class _StorageFaultFilter(logging.Filter):
  """Drops Orbax's logged tracebacks of a storage fault: the caller gets it as one line."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not (record.levelno >= logging.ERROR and exc is not None
                and storage.fault_errno(exc) is not None)


_FILTER = _StorageFaultFilter()


def _late_callback(unraisable) -> bool:
  """Whether an unraisable exception is a Tensorstore callback arriving after Orbax's event loop
  closed: Orbax gives up on a read or write at its first error (a damaged step, a full disk)
  and closes the loop, and the operations still in flight then finish into it. The error itself
  has already reached the caller; these would add a traceback each to its one line."""
  exc = unraisable.exc_value
  frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
  in_asyncio = [f.name for f in frames if os.path.basename(f.filename) == 'base_events.py']
  return (type(exc) is RuntimeError and str(exc) == 'Event loop is closed'
          and in_asyncio[-2:] == ['call_soon_threadsafe', '_check_closed'])


def _drop_late_callbacks(unraisable):
  try:
    late = _late_callback(unraisable)
  except Exception:  # e.g. at interpreter shutdown: report as Python would
    late = False
  if not late:
    _PREVIOUS_HOOK(unraisable)


_PREVIOUS_HOOK = sys.unraisablehook


def _install_fault_filter():
  absl = logging.getLogger('absl')
  if _FILTER not in absl.filters:
    absl.addFilter(_FILTER)
  global _PREVIOUS_HOOK
  if sys.unraisablehook is not _drop_late_callbacks:
    _PREVIOUS_HOOK = sys.unraisablehook
    sys.unraisablehook = _drop_late_callbacks


class StopFlag:
  """Set by SIGTERM or SIGINT while installed; a second Ctrl-C exits at once."""

  def __init__(self):
    self.signal_name: str | None = None
    self._event = threading.Event()

  def __bool__(self):
    return self._event.is_set()

  def _handle(self, signum, frame):
    if self._event.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield self  # signals can only be caught on the main thread (e.g. not in some notebooks)
      return
    old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)


def notes_path(checkpoints: str) -> str:
  """Where a run's notes on its texts are kept: beside its checkpoint directory."""
  return os.path.join(os.path.dirname(os.path.abspath(checkpoints)), 'notes.json')


def load_notes(path: str, note: str) -> dict[str, str]:
  """The notes (text -> answer) kept at ``path`` under ``note``; none where there are none, or
  the file cannot be read (they are then read from the model again)."""
  if not note or not os.path.exists(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      kept = json.load(f)
    answers = kept['answers'] if kept.get('note') == note else {}
    return {str(t): str(a) for t, a in answers.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    log.warning('The kept notes %s are unreadable (%s); the texts are read again.', path, e)
    return {}


def save_notes(path: str, note: str, answers: dict[str, str]):
  """Keeps the notes, so a resumed run does not put its texts to the judge again; a failed
  write only costs that."""
  try:
    storage.write_json(path, {'note': note, 'answers': answers}, indent=None)
  except OSError as e:  # StorageError too
    log.warning('Could not keep the notes in %s (%s); a resumed run reads them again.', path, e)
