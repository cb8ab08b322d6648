"""docs/colab_tpu.ipynb runs: its cells, executed headless on CPU with the embedded default.

No Jupyter is needed: the .ipynb is JSON, so its code cells are exec'd in order in one namespace,
as a kernel would run them. Cells tagged ``colab-only`` (installation, Google Drive) are skipped,
as are IPython-only lines (``%magic``, ``!shell``); after the ``parameters`` cell the test sets
``QUICK = True`` and a temporary ``WORKDIR``, as papermill would. Quick mode is
``configs/animal.py:quick`` (20 steps on small splits), so the whole notebook takes about a
minute on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'docs', 'colab_tpu.ipynb')


def code_cells(notebook: dict) -> list[tuple[tuple[str, ...], str]]:
  """(tags, source) of each code cell, IPython-only lines removed."""
  out = []
  for cell in notebook['cells']:
    if cell['cell_type'] != 'code':
      continue
    source = ''.join(cell['source'])
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(('%', '!'))]
    out.append((tuple(cell.get('metadata', {}).get('tags', ())), '\n'.join(lines)))
  return out


def execute(notebook: dict, overrides: dict) -> dict:
  namespace = {'__name__': '__main__'}
  for i, (tags, source) in enumerate(code_cells(notebook)):
    if 'colab-only' in tags:
      continue
    exec(compile(source, f'{NOTEBOOK} code cell {i}', 'exec'), namespace)
    if 'parameters' in tags:
      namespace.update(overrides)
  return namespace


def load_notebook() -> dict:
  with open(NOTEBOOK, encoding='utf-8') as f:
    return json.load(f)


def test_notebook_is_current():
  path = os.path.join(ROOT, 'docs', 'make_colab_notebook.py')
  spec = importlib.util.spec_from_file_location('make_colab_notebook', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with open(NOTEBOOK, encoding='utf-8') as f:
    committed = f.read()
  assert committed == module.render(), (
      'docs/colab_tpu.ipynb differs from what docs/make_colab_notebook.py writes: edit the '
      'generator and run `python docs/make_colab_notebook.py` (do not edit the .ipynb by hand).')


def test_every_cell_compiles_and_tags_are_known():
  """Also the colab-only cells, which the run below skips."""
  notebook = load_notebook()
  assert notebook['nbformat'] == 4
  tags = set()
  for i, (cell_tags, source) in enumerate(code_cells(notebook)):
    compile(source, f'code cell {i}', 'exec')
    tags.update(cell_tags)
  assert tags <= {'colab-only', 'parameters'}, tags
  assert {'colab-only', 'parameters'} <= tags


def test_execute_skips_colab_only_cells_and_applies_overrides():
  notebook = {'cells': [
      {'cell_type': 'code', 'metadata': {'tags': ['colab-only']}, 'source': ['raise SystemExit']},
      {'cell_type': 'code', 'metadata': {'tags': ['parameters']}, 'source': ['QUICK = False']},
      {'cell_type': 'markdown', 'metadata': {}, 'source': ['raise SystemExit']},
      {'cell_type': 'code', 'metadata': {}, 'source': ['%pip install x\n', 'seen = QUICK']},
  ]}
  assert execute(notebook, {'QUICK': True})['seen'] is True


def fake_ipython(shown: list):
  """An ``IPython`` module whose display records what the notebook shows, so the live-plot path
  runs here as it would in a kernel (IPython itself is not a dependency)."""

  class Handle:
    def update(self, obj):
      shown.append(obj)

  def display(obj, display_id=False):
    shown.append(obj)
    return Handle() if display_id else None

  # A shell, as matplotlib sees one when pyplot starts under IPython (the run's own plot).
  shell = types.SimpleNamespace(events=types.SimpleNamespace(register=lambda *a: None,
                                                             unregister=lambda *a: None))
  module = types.ModuleType('IPython')
  module.get_ipython = lambda: shell
  module.version_info = (9, 0, 0)
  module.display = types.SimpleNamespace(display=display,
                                         Image=lambda *args, **kwargs: (args, kwargs))
  return module


def test_notebook_runs_headless_in_quick_mode(tmp_path, monkeypatch):
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  monkeypatch.chdir(ROOT)
  shown = []
  monkeypatch.setitem(sys.modules, 'IPython', fake_ipython(shown))
  workdir = str(tmp_path / 'notebook')
  ns = execute(load_notebook(), {'QUICK': True, 'WORKDIR': workdir})
  result = ns['result']
  assert result['config']['steps'] == 20, 'QUICK did not select configs/animal.py:quick'
  assert result['feature'] == 'animal'
  assert isinstance(result['label'], str) and result['label'].strip()
  roles = [s['role'] for s in result['heldout']['scores']]
  assert roles[0] == 'found' and 'reference' in roles and roles.count('random') == 2
  for s in result['heldout']['scores']:
    assert 0.0 <= s['auroc'] <= 1.0
  assert result['heldout']['examples'] > 0 and isinstance(result['identifiable'], bool)
  # The plot of the leading tokens, drawn from the trajectory the run wrote.
  assert os.path.getsize(os.path.join(workdir, 'leading_tokens.png')) > 1000
  assert len(ns['read_trajectory'](workdir)) == result['steps']
  # The live plot: a first frame, redraws while the run went on, the final frame, and the run's
  # own trajectory.png shown by the summary cell.
  frames = [kw['data'] for args, kw in shown if 'data' in kw]
  assert len(frames) >= 3 and all(f.startswith(b'\x89PNG') for f in frames), len(frames)
  assert shown[-1][0] == (os.path.join(workdir, 'trajectory.png'),)
  assert 'label' in ns['views'].summary(result)
  assert ns['mesh'].shape['data'] >= 1


if __name__ == '__main__':
  pytest.main([__file__, '-q'])
