"""Markdown table of finished runs, for docs/results.md.

    python experiments/results_table.py workdirs/chinese workdirs/animal workdirs/mammal \
        workdirs/number

Reads each workdir's result.json (written by ``python -m tokenspace_jax.main``) and prints one
row per run: the found label, how fast it converged, and its held-out scores against the human
reference word and the random tokens.
"""

from __future__ import annotations

import json
import os
import sys


def row(workdir: str) -> str:
  with open(os.path.join(workdir, 'result.json')) as f:
    r = json.load(f)
  scores = r['heldout']['scores']
  pick = lambda role: [s for s in scores if s['role'] == role]
  found, ref, rand = pick('found')[0], (pick('reference') or [None])[0], pick('random')
  mean = lambda xs: sum(xs) / len(xs) if xs else float('nan')
  fmt = lambda s: f'{s["auroc"]:.3f} / {s["balanced_accuracy"]:.3f}' if s else 'n/a'
  p90 = r['steps_to_p90'] if r['steps_to_p90'] is not None else 'never'
  return (f'| {r["feature"]} | `{found["token"]!r}` | {r["probability"]:.2f} | {p90} | '
          f'{r["steps"]} | {r["wall_seconds"]:.0f} | {fmt(found)} | '
          f'`{ref["token"]!r}` {fmt(ref)} | {mean([s["auroc"] for s in rand]):.3f} | '
          f'{"yes" if r["identifiable"] else "**no**"} |')


def main(workdirs):
  print('| feature | label | p | steps to p≥0.9 | steps | wall s | found AUROC / bal.acc | '
        'reference AUROC / bal.acc | random AUROC (mean) | identifiable |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for w in workdirs:
    print(row(w))


if __name__ == '__main__':
  main(sys.argv[1:])
