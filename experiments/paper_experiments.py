"""The paper's experiments and ablations on the embedded default; tables for docs/experiments.md.

    python experiments/paper_experiments.py run ablation      # ~10 min on 2 CPU cores
    python experiments/paper_experiments.py run balance       # ~10 min
    python experiments/paper_experiments.py run tokens        # ~10 min
    python experiments/paper_experiments.py table             # prints the markdown tables
    python experiments/paper_experiments.py plots             # writes docs/img/ figures

Each experiment loads the model once and writes one workdir per run under
``workdirs/experiments/``; rerunning resumes or reuses finished runs (as ``main`` does), so the
table can be regenerated from the workdirs at any time. The experiments:

* ``ablation``: the ``animal`` feature with the entropy and KL weights each on (the defaults) and
  off, the four combinations descended together as the rows of one sweep
  (``configs/animal.py:ablation``): what the label converges to, and how fast.
* ``balance``: the ``mammal`` feature with natural data (every word of the training texts,
  sampled in its natural proportion), balanced sampling with easy negatives, and balanced
  sampling with hard negatives (birds, fish, reptiles): does the label narrow from "animal" to
  "mammal"? (The held-out sets differ with the negatives; each run is scored on its own.)
* ``tokens``: single-token against two-token labels (``label.num_tokens=2``) on ``animal`` and
  ``mammal``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, 'workdirs', 'experiments')


def config_for(feature: str, arg: str = '', **changes):
  spec = importlib.util.spec_from_file_location(feature, os.path.join(ROOT, 'configs',
                                                                      f'{feature}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from tokenspace_jax import config_defaults

  # The experiments are on the embedded default, whichever model a config itself names.
  c = module.get_config(','.join(filter(None, ['model=default', arg])))
  c.progress = False
  return config_defaults.override(c, changes)


# name -> (feature, config argument, overrides); a sweep when the argument asks for one.
RUNS = {
    'ablation': {'animal-ablation': ('animal', 'ablation', {})},
    'balance': {
        # Every word of the texts as a negative (capped at 800 train examples: all 124 positives
        # and 676 negatives), sampled in that proportion.
        'mammal-natural': ('mammal', '', {'data.sampling': 'natural',
                                          'feature.negatives': 'natural',
                                          'feature.max_train': 800}),
        'mammal-balanced-easy': ('mammal', '', {'feature.negatives': 'easy'}),
        'mammal-balanced-hard': ('mammal', '', {}),
    },
    'tokens': {
        'animal-two-token': ('animal', 'two', {}),
        'mammal-two-token': ('mammal', 'two', {}),
    },
}


def run(experiment: str):
  import logging

  from tokenspace_jax import main
  from tokenspace_jax.models import load_model
  from tokenspace_jax.outputs import views

  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  lm = load_model('default')
  for name, (feature, arg, changes) in RUNS[experiment].items():
    config = config_for(feature, arg, **changes)
    workdir = os.path.join(OUT, name)
    if main.is_sweep(config):
      print(views.sweep_summary(main.run(config, workdir, lm=lm)), flush=True)
    else:
      print(views.summary(main.run(config, workdir, lm=lm)), flush=True)


def _load(name: str, file: str):
  path = os.path.join(OUT, name, file)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _auroc(result, role):
  return next((s['auroc'] for s in result['heldout']['scores'] if s['role'] == role), None)


def table():
  lines = []
  sw = _load('animal-ablation', 'sweep.json')
  if sw:
    lines += ['### Ablation: `animal`, entropy and KL terms on and off (one sweep, 4 rows)', '',
              '| w_entropy | w_kl | label | p | steps to p ≥ 0.9 | held-out AUROC |',
              '|---:|---:|---|---:|---:|---:|']
    for r in sw['rows']:
      p = f'{r["probability"]:.2f}' if r.get('probability') is not None else '-'
      lines.append(f'| {r["w_entropy"]:g} | {r["w_kl"]:g} | `{r["label"]!r}` | '
                   f'{p} | {r["steps_to_p90"] or "never"} | '
                   f'{_auroc(r, "found"):.3f} |')
    base = ', '.join(f'{s["role"]} `{s["token"]!r}` {s["auroc"]:.3f}' for s in sw['baselines'])
    lines += ['', f'Baselines: {base}. Sweep wall time {sw["wall_seconds"]:.0f} s.', '']
  rows = [(name, _load(name, 'result.json')) for name in [*RUNS['balance'], *RUNS['tokens']]]
  if any(r for _, r in rows):
    lines += ['### Data balance and label length', '',
              '| run | label | p | steps to p ≥ 0.9 | AUROC found / reference / random mean | '
              'verdict | wall time |', '|---|---|---:|---:|---|---|---:|']
    for name, r in rows:
      if r is None:
        continue
      v = r['heldout']['verdict']
      p = f'{r["probability"]:.2f}' if r.get('probability') is not None else '-'
      lines.append(f'| {name} | `{r["label"]!r}` | {p} | '
                   f'{r["steps_to_p90"] or "never"} | {_auroc(r, "found"):.3f} / '
                   f'{_auroc(r, "reference") or float("nan"):.3f} / '
                   f'{v["random_auroc_mean"]:.3f} | '
                   f'{v["status"]} | '
                   f'{r["wall_seconds"]:.0f} s |')
  print('\n'.join(lines))


def plots():
  """docs/img/ablation_animal.png (each row's top-token probability by step) and the two-token
  and balance runs' own trajectory plots, copied next to it."""
  import shutil

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  img = os.path.join(ROOT, 'docs', 'img')
  path = os.path.join(OUT, 'animal-ablation', 'trajectory.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      records = [json.loads(line) for line in f]
    sweep = _load('animal-ablation', 'sweep.json')
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r, row in enumerate(sweep['rows']):
      mine = [x for x in records if x['row'] == r]
      ax.plot([x['step'] for x in mine], [min(x['label_p']) for x in mine],
              label=f'w_entropy={row["w_entropy"]:g}, w_kl={row["w_kl"]:g}: {row["label"]!r}')
    ax.set_xlabel('step')
    ax.set_ylabel('p of the top token')
    ax.set_title('animal: entropy and KL terms on and off')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(img, 'ablation_animal.png'), dpi=100)
  for name in [*RUNS['balance'], *RUNS['tokens']]:
    src = os.path.join(OUT, name, 'trajectory.png')
    if os.path.exists(src):
      shutil.copy(src, os.path.join(img, f'trajectory_{name}.png'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='cmd', required=True)
  r = sub.add_parser('run')
  r.add_argument('experiment', choices=sorted(RUNS))
  sub.add_parser('table')
  sub.add_parser('plots')
  args = parser.parse_args()
  if args.cmd == 'run':
    run(args.experiment)
  elif args.cmd == 'plots':
    plots()
  else:
    table()


if __name__ == '__main__':
  main()
