"""Features per hour of the batch job, and its peak memory, for settings side by side.

    python experiments/batch_throughput.py --set fps1=batch.features_per_step=1 \\
        --set fps2=batch.features_per_step=2 --set fps4=batch.features_per_step=4 \\
        [--records /tmp/four_features.jsonl] [--rounds 1] [--out /tmp/batch_throughput.json]

Each round runs ``python -m tokenspace_jax.batch --config=configs/batch.py`` once per setting,
in turn (so a busy spell of the machine hits every setting alike), each in a fresh process and
a fresh workdir, on the same records file (by default the four built-in features as records,
written by ``tokenspace_jax.features.synthetic_records`` if absent). It prints the wall time of
the whole job, features per hour, the process's peak resident memory, and each feature's label,
verdict and steps, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from child import alternate, run_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(records: str, arg: str, workdir: str) -> dict:
  spec = os.path.join(ROOT, 'configs', 'batch.py') + (f':{arg}' if arg else '')
  command = [sys.executable, '-m', 'tokenspace_jax.batch', f'--config={spec}',
             f'--config.features={records}', f'--workdir={workdir}']
  run = run_child(command, ROOT, dict(os.environ))
  if run.code != 0:
    raise RuntimeError(f'{arg}: exit {run.code}\n{run.output[-3000:]}')
  with open(os.path.join(workdir, 'labels.jsonl'), encoding='utf-8') as f:
    lines = [json.loads(line) for line in f if line.strip()]
  cache_mb = [float(x) for x in re.findall(r'\(([0-9.]+) MB of cached keys and values\)',
                                            run.output)]
  return {'wall': run.wall, 'features': len(lines),
          'features_per_hour': 3600 * len(lines) / run.wall, 'peak_rss_gb': run.peak_rss_gb,
          'cache_mb_per_group': max(cache_mb) if cache_mb else None,
          'labels': [{'feature': x.get('feature_id'), 'label': x.get('label'),
                      'steps': x.get('steps'), 'auroc': (x.get('auroc') or {}).get('found'),
                      'verdict': (x.get('verdict') or x.get('error') or '').split(':')[0]}
                     for x in lines]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--records', default='/tmp/four_features.jsonl')
  parser.add_argument('--set', action='append', default=[], metavar='NAME=ARG',
                      help='a named setting: config arguments of configs/batch.py')
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--out', default='/tmp/batch_throughput.json')
  args = parser.parse_args()
  settings = dict(s.split('=', 1) for s in args.set) or {'default': ''}
  if not os.path.exists(args.records):
    subprocess.run([sys.executable, '-m', 'tokenspace_jax.features.synthetic_records',
                    args.records], cwd=ROOT, check=True)
  records = os.path.abspath(args.records)
  run = lambda name, r, workdir: {'setting': name, 'arg': settings[name], 'round': r,
                                  **run_once(records, settings[name], workdir)}
  runs = alternate(settings, args.rounds, run, args.out, {'records': args.records})
  print(f'\n{args.records}')
  print('| setting | round | seconds | features | features/hour | peak RSS GB | '
        'caches MB (largest group) | labels |')
  print('|---|---:|---:|---:|---:|---:|---:|---|')
  for row in runs:
    auroc = lambda x: '' if x.get('auroc') is None else f', held-out AUROC {x["auroc"]:.3f}'
    labels = ', '.join(f'{x["feature"]}: {x["label"]!r} ({x["verdict"]}, {x.get("steps")} steps'
                       f'{auroc(x)})' for x in row['labels'])
    print(f'| {row["setting"]} | {row["round"]} | {row["wall"]:.0f} | {row["features"]} | '
          f'{row["features_per_hour"]:.1f} | {row["peak_rss_gb"]:.2f} | '
          f'{row["cache_mb_per_group"] or 0:.0f} | {labels} |')


if __name__ == '__main__':
  main()
