"""What a run leaves in its workdir: trajectory.jsonl as it goes, result.json and a plot."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np


class Trajectory:
  """Per-step records, appended and flushed each step; on resume, cut back to the checkpoint.

  ``write=False`` (processes other than 0 of a multi-host job) reads the file but never writes.
  """

  def __init__(self, path: str, resume_step: int, write: bool = True):
    self.path = path
    self.write = write
    self.records = []
    if os.path.exists(path) and resume_step > 0:
      with open(path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            break  # a line cut short by a kill
          if record['step'] > resume_step:
            break
          self.records.append(record)
    self._file = None
    if write:
      self._write_all()
      self._file = open(path, 'a')

  def _write_all(self):
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for r in self.records:
        f.write(json.dumps(r, ensure_ascii=False) + '\n')
    os.replace(tmp, self.path)

  def append(self, record: dict):
    self.records.append(record)
    if self._file is not None:
      self._file.write(json.dumps(record, ensure_ascii=False) + '\n')
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()


def write_json(path: str, data: dict):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2, ensure_ascii=False, default=_jsonable)
  os.replace(tmp, path)


def _jsonable(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


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
  fig.savefig(path, dpi=110)
  plt.close(fig)
