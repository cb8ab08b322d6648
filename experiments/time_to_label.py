"""Start to label: the whole main command, timed per phase, for checkouts side by side.

    python experiments/time_to_label.py --config configs/animal.py \\
        --code before=/tmp/tsj-before --code after=. [--rounds 1] [--out /tmp/ttl.json]
    python experiments/time_to_label.py --config configs/animal.py \\
        --code f32=. --code bf16=. --set bf16=model.cache_dtype=bfloat16

Each round runs ``python -m tokenspace_jax.main --config=CONFIG`` once per checkout, in turn
(alternating, so a busy spell of the machine hits every checkout alike), each in a fresh process
and a fresh workdir, with ``tokenspace_jax`` imported from that checkout; the models' assembled
files and built tokenizers are cached once for all. It prints, per run, the wall time of the whole
process (start to label) and its peak resident memory, the record's phases (model load, pool:
prefix caches, priors and contrast baselines, and first the notes on the texts where the prompt
has them, also given alone as notes; descent; scoring: the final choice and the verdict), the
steps, the label, its held-out AUROC and verdict, and writes them all as JSON. A
checkout is any folder holding a ``tokenspace_jax`` package, such as a ``git worktree add
/tmp/tsj-before <commit>``; ``--set NAME=ARG`` adds config arguments to one checkout's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from child import alternate, run_child

PHASES = ('model', 'pool', 'notes', 'descent', 'compile', 'scoring')


def run_once(checkout: str, config: str, arg: str, workdir: str) -> dict:
  spec = os.path.abspath(config) + (f':{arg}' if arg else '')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.abspath(checkout), os.environ.get('PYTHONPATH', '')]))
  command = [sys.executable, '-m', 'tokenspace_jax.main', f'--config={spec}',
             f'--workdir={workdir}', '--config.progress=False']
  run = run_child(command, os.path.abspath(checkout), env)
  if run.code != 0:
    raise RuntimeError(f'{checkout}: exit {run.code}\n{run.output[-3000:]}')
  with open(os.path.join(workdir, 'result.json')) as f:
    result = json.load(f)
  phases = result.get('phase_seconds', {})
  cache_mb = re.findall(r'\(([0-9.]+) MB of keys and values\)', run.output)
  return {'checkout': checkout, 'wall': run.wall, **{p: phases.get(p) for p in PHASES},
          'cache_mb': float(cache_mb[-1]) if cache_mb else None,
          'peak_rss_gb': run.peak_rss_gb,
          'steps': result.get('steps'), 'label': result.get('label'),
          'verdict': (result.get('verdict') or '').split(':')[0],
          'heldout_auroc': ((result.get('heldout') or {}).get('scores') or [{}])[0].get('auroc')}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/animal.py')
  parser.add_argument('--arg', default='', help='the config argument (e.g. quick)')
  parser.add_argument('--code', action='append', default=[], metavar='NAME=CHECKOUT')
  parser.add_argument('--set', action='append', default=[], metavar='NAME=ARG',
                      help='a config argument for that --code name only, after --arg (the same '
                           'checkout under two names compares two settings)')
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--out', default='/tmp/time_to_label.json')
  args = parser.parse_args()
  codes = dict(s.split('=', 1) for s in args.code) or {'here': '.'}
  extra = dict(s.split('=', 1) for s in args.set)
  if set(extra) - set(codes):
    sys.exit(f'--set names {sorted(set(extra) - set(codes))} are not --code names.')
  for name, path in codes.items():
    if not os.path.isdir(os.path.join(path, 'tokenspace_jax')):
      sys.exit(f'--code {name}={path}: no tokenspace_jax package there; give a checkout.')

  def run(name, r, workdir):
    arg = ','.join(filter(None, [args.arg, extra.get(name, '')]))
    return {'code': name, 'round': r, 'arg': arg,
            **run_once(codes[name], args.config, arg, workdir)}

  runs = alternate(codes, args.rounds, run, args.out, {'config': args.config, 'arg': args.arg})
  cell = lambda v: '-' if v is None else f'{v:.1f}'
  cell3 = lambda v: '-' if v is None else f'{v:.3f}'
  print(f'\n{args.config}{":" + args.arg if args.arg else ""}, seconds')
  print('| code | round | start to label | ' + ' | '.join(PHASES)
        + ' | peak RSS GB | caches MB | steps | label | held-out AUROC | verdict |')
  print('|---|---:|---:|' + '---:|' * len(PHASES) + '---:|---:|---:|---|---:|---|')
  for row in runs:
    print(f'| {row["code"]} | {row["round"]} | {row["wall"]:.1f} | '
          + ' | '.join(cell(row[p]) for p in PHASES)
          + f' | {row["peak_rss_gb"]:.2f} | {cell(row.get("cache_mb"))} | {row["steps"]} | '
          + f'{row["label"]!r} | '
          + f'{cell3(row["heldout_auroc"])} | {row["verdict"]} |')


if __name__ == '__main__':
  main()
