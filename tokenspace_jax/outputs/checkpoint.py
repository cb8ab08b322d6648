"""Orbax checkpoints of the descent state, and a stop flag raised by SIGTERM / Ctrl-C.

Preemptible machines send SIGTERM and give a few seconds; the handler only sets a flag, the loop
finishes the step in flight, writes a checkpoint and exits, so a rerun of the same command
resumes exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, every: int, keep: int = 2):
    self.directory = os.path.abspath(directory)  # orbax refuses relative paths
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(1, every),
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state):
    step = self._manager.latest_step()
    if step is None:
      return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def save(self, step: int, state, force: bool = False) -> bool:
    if step in self._manager.all_steps():
      return False  # already on disk (a forced save right after a periodic one)
    saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    return bool(saved)

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


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
