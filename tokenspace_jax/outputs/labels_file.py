"""An append-only JSON Lines file of finished features that survives being killed mid-write.

A batch job is preempted at arbitrary moments, so the file is its record of what is done: a
line is on disk (flushed and fsynced) before the job moves on, a feature already in the file is
never written again, and a last line cut short by a kill is removed on reopening (its feature is
then simply not done yet). A line is one ``write()`` cut back if it fails, and a full disk or a
read-only workdir is one :class:`storage.StorageError` line naming the file.
"""

from __future__ import annotations

import json
import logging
import os

from tokenspace_jax.outputs import storage

log = logging.getLogger('tokenspace_jax')


class LabelsFile:
  def __init__(self, path: str, key: str = 'feature_id'):
    self.path = path
    self.key = key
    self._done: set = set()
    self.lines = 0
    self._repair_and_read()
    self._fd = None  # opened by the first append: a finished file may lie on a read-only disk

  def _repair_and_read(self):
    if not os.path.exists(self.path):
      return
    with open(self.path, 'rb') as f:
      data = f.read()
    complete = data[:data.rfind(b'\n') + 1]
    if len(complete) != len(data):
      log.warning('%s: dropping a last line cut short (%d bytes), most likely by a kill.',
                  self.path, len(data) - len(complete))
      with storage.translated(self.path), open(self.path, 'r+b') as f:
        f.truncate(len(complete))
        os.fsync(f.fileno())
    for line in complete.decode('utf-8').split('\n'):
      if line.strip():
        self._done.add(_hashable(json.loads(line)[self.key]))
        self.lines += 1

  def __contains__(self, feature_id) -> bool:
    return _hashable(feature_id) in self._done

  def append(self, record: dict) -> bool:
    """Writes ``record`` as one durable line; False (and nothing written) if already there."""
    fid = _hashable(record[self.key])
    if fid in self._done:
      return False
    line = (json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8')
    if self._fd is None:
      self._fd = storage.open_append(self.path)
    storage.append_line(self._fd, line, self.path)
    storage.fsync(self._fd, self.path)
    self._done.add(fid)
    self.lines += 1
    return True

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def _hashable(feature_id):
  """Ids as the file stores them: 7 and "7" are different features."""
  return (type(feature_id).__name__, feature_id)
