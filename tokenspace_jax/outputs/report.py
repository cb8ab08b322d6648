"""What a run leaves in its workdir: trajectory.jsonl as it goes, result.json and a plot."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from tokenspace_jax.outputs import storage

log = logging.getLogger('tokenspace_jax')


class Trajectory:
  """Per-step records, appended each step; on resume, cut back to the checkpoint.

  The file only ever grows by whole lines: each record is one ``write()`` of its full line, cut
  back if that fails (a full disk), so a kill or a fault can at most leave a last line cut
  short, and reopening drops it together with the records after ``resume_step`` by truncating
  the file (which needs no free space, unlike rewriting it). ``write=False`` (processes other
  than 0 of a multi-host job) reads the file but never writes.
  """

  def __init__(self, path: str, resume_step: int, write: bool = True):
    self.path = path
    self.write = write
    self.records = []
    keep = 0  # bytes of the file that hold the records kept
    size = 0
    if os.path.exists(path):
      with open(path, 'rb') as f:
        data = f.read()
      size = len(data)
      if resume_step > 0:
        keep = self._read(data, resume_step)
    self._fd = None
    if write:
      self._fd = storage.open_append(path)
      if keep != size:
        with storage.translated(path):
          os.ftruncate(self._fd, keep)
          os.fsync(self._fd)

  def _read(self, data: bytes, resume_step: int) -> int:
    keep = 0
    while keep < len(data):
      end = data.find(b'\n', keep)
      if end < 0:
        log.warning('%s: dropping a last line cut short (%d bytes), most likely by a kill.',
                    self.path, len(data) - keep)
        break
      try:
        record = json.loads(data[keep:end])
      except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning('%s: line %d is not JSON; it and the lines after it are dropped.',
                    self.path, len(self.records) + 1)
        break
      if record['step'] > resume_step:
        break
      self.records.append(record)
      keep = end + 1
    return keep

  def append(self, record: dict):
    if self._fd is not None:
      line = (json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8')
      storage.append_line(self._fd, line, self.path)
    self.records.append(record)  # after the write: ``records`` never holds more than the file

  def sync(self):
    """Makes the lines written so far durable (e.g. right after a checkpoint)."""
    if self._fd is not None:
      storage.fsync(self._fd, self.path)

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def write_json(path: str, data: dict):
  """Replaces ``path`` durably (temporary file, fsync, rename): a fault leaves the old file."""
  storage.write_json(path, data)


_jsonable = storage.jsonable


def _cjk_font():
  """A font that renders CJK labels: a system one if present, else the one mplfonts ships."""
  from matplotlib import font_manager

  wanted = ('Noto Sans CJK', 'Noto Sans SC', 'Source Han Sans', 'WenQuanYi', 'SimHei',
            'PingFang', 'Microsoft YaHei', 'Heiti', 'Arial Unicode')
  for font in font_manager.fontManager.ttflist:
    if any(font.name.startswith(w) for w in wanted):
      return font_manager.FontProperties(fname=font.fname)
  try:
    import mplfonts

    path = os.path.join(os.path.dirname(mplfonts.__file__), 'fonts', 'NotoSansCJKsc-Regular.otf')
    if os.path.exists(path):
      return font_manager.FontProperties(fname=path)
  except ImportError:
    pass
  return None


def plot_trajectory(records: Sequence[dict], path: str, title: str, leading: int = 6):
  """Probability of the leading tokens over steps, and the loss terms."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  if not records:
    return
  steps = np.array([r['step'] for r in records])
  final = [t for t, _ in records[-1]['top'][:leading]]
  ever_first = [r['top'][0][0] for r in records]
  tokens = list(dict.fromkeys(final + ever_first))[:leading + 2]
  font = _cjk_font()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
  for tok in tokens:
    probs = [dict(map(tuple, r['top'])).get(tok, np.nan) for r in records]
    ax1.plot(steps, probs, label=repr(tok))
  ax1.set_xlabel('step')
  ax1.set_ylabel('p(token) (shown while in the top 5)')
  ax1.set_ylim(0, 1)
  ax1.legend(prop=font, fontsize=8, loc='upper left')
  ax1.set_title(title, fontproperties=font)
  for key in ('loss', 'answer_ce', 'entropy', 'kl'):
    ax2.plot(steps, [r[key] for r in records], label=key)
  ax2.set_xlabel('step')
  ax2.set_yscale('symlog', linthresh=0.1)
  ax2.legend(fontsize=8)
  ax2.set_title('loss terms')
  fig.tight_layout()
  image = io.BytesIO()
  try:
    fig.savefig(image, format='png', dpi=110)
  finally:
    plt.close(fig)
  storage.atomic_write_bytes(path, image.getvalue())
