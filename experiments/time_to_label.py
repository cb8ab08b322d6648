"""Start to label: the whole main command, timed per phase, for checkouts side by side.

    python experiments/time_to_label.py --config configs/animal.py \\
        --code before=/tmp/tsj-before --code after=. [--rounds 1] [--out /tmp/ttl.json]

Each round runs ``python -m tokenspace_jax.main --config=CONFIG`` once per checkout, in turn
(alternating, so a busy spell of the machine hits every checkout alike), each in a fresh process
and a fresh workdir, with ``tokenspace_jax`` imported from that checkout; the models' assembled
files and built tokenizers are cached once for all. It prints, per run, the wall time of the whole
process (start to label), the record's phases (model load, pool: prefix caches, priors and
contrast baselines; descent; scoring: the final choice and the verdict), the steps, the label
and its verdict, and writes them all as JSON. A checkout is any folder holding a
``tokenspace_jax`` package, such as a ``git worktree add /tmp/tsj-before <commit>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

PHASES = ('model', 'pool', 'descent', 'compile', 'scoring')


def run_once(checkout: str, config: str, arg: str, workdir: str) -> dict:
  spec = os.path.abspath(config) + (f':{arg}' if arg else '')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.abspath(checkout), os.environ.get('PYTHONPATH', '')]))
  command = [sys.executable, '-m', 'tokenspace_jax.main', f'--config={spec}',
             f'--workdir={workdir}', '--config.progress=False']
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=os.path.abspath(checkout), env=env, capture_output=True,
                        text=True)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f'{checkout}: exit {proc.returncode}\n{proc.stderr[-3000:]}')
  with open(os.path.join(workdir, 'result.json')) as f:
    result = json.load(f)
  phases = result.get('phase_seconds', {})
  return {'checkout': checkout, 'wall': wall, **{p: phases.get(p) for p in PHASES},
          'steps': result.get('steps'), 'label': result.get('label'),
          'verdict': (result.get('verdict') or '').split(':')[0]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/animal.py')
  parser.add_argument('--arg', default='', help='the config argument (e.g. quick)')
  parser.add_argument('--code', action='append', default=[], metavar='NAME=CHECKOUT')
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--out', default='/tmp/time_to_label.json')
  args = parser.parse_args()
  codes = dict(s.split('=', 1) for s in args.code) or {'here': '.'}
  for name, path in codes.items():
    if not os.path.isdir(os.path.join(path, 'tokenspace_jax')):
      sys.exit(f'--code {name}={path}: no tokenspace_jax package there; give a checkout.')
  runs = []
  root = tempfile.mkdtemp(prefix='time_to_label-')
  try:
    for r in range(args.rounds):
      for name, path in codes.items():
        row = {'code': name, 'round': r, **run_once(path, args.config, args.arg,
                                                    os.path.join(root, f'{name}-{r}'))}
        runs.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, 'w') as f:  # after every run: a later failure keeps what finished
          json.dump({'config': args.config, 'arg': args.arg, 'runs': runs}, f, indent=1)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  cell = lambda v: '-' if v is None else f'{v:.1f}'
  print(f'\n{args.config}{":" + args.arg if args.arg else ""}, seconds')
  print('| code | round | start to label | ' + ' | '.join(PHASES)
        + ' | steps | label | verdict |')
  print('|---|---:|---:|' + '---:|' * len(PHASES) + '---:|---|---|')
  for row in runs:
    print(f'| {row["code"]} | {row["round"]} | {row["wall"]:.1f} | '
          + ' | '.join(cell(row[p]) for p in PHASES)
          + f' | {row["steps"]} | {row["label"]!r} | {row["verdict"]} |')


if __name__ == '__main__':
  main()
