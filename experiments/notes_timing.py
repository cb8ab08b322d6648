"""The judge's notes on a feature's texts (``prompt.note``), timed for checkouts side by side.

    git worktree add /tmp/tsj-before <commit>
    python experiments/notes_timing.py --config configs/chinese.py \\
        --code before=/tmp/tsj-before --code after=. [--rounds 2] [--out /tmp/notes.json]

Each round reads the notes of the config's feature (its capped train and held-out examples'
texts, as ``engine.pool.build_pool`` does) once per checkout, in turn, each in a fresh process
with ``tokenspace_jax`` imported from that checkout; model load is not timed. It prints the
seconds ``classifier.notes.read_texts`` took (compilation included) and whether every checkout
gave every text the same answer.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

from child import alternate, run_child


def worker(config_spec: str, note: str):
  import importlib.util
  import time

  from tokenspace_jax.classifier import notes
  from tokenspace_jax.engine.pool import feature_splits
  from tokenspace_jax.features.from_config import load_feature
  from tokenspace_jax.models import load_model
  path, _, arg = config_spec.partition(':')
  spec = importlib.util.spec_from_file_location('config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  note = note or config.prompt.note
  lm = load_model(config.model.source)
  train, heldout = feature_splits(config, load_feature(config.feature, lm.tokenizer))
  start = time.perf_counter()
  answers = notes.read_texts(lm, [e.text for e in train + heldout], note)
  print('RESULT ' + json.dumps({'seconds': time.perf_counter() - start, 'answers': answers},
                               ensure_ascii=False))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/chinese.py')
  parser.add_argument('--note', default='', help="default: the config's prompt.note")
  parser.add_argument('--code', action='append', default=[], metavar='NAME=CHECKOUT')
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--out', default='/tmp/notes_timing.json')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args.config, args.note)
  codes = dict(s.split('=', 1) for s in args.code) or {'here': '.'}

  def run(name, r, _):
    checkout = os.path.abspath(codes[name])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([checkout, os.environ.get('PYTHONPATH',
                                                                                 '')]))
    done = run_child([sys.executable, os.path.abspath(__file__), '--worker', '--config',
                      os.path.abspath(args.config), '--note', args.note], checkout, env)
    lines = [x for x in done.output.splitlines() if x.startswith('RESULT ')]
    if done.code != 0 or not lines:
      raise RuntimeError(f'{checkout}: exit {done.code}\n{done.output[-3000:]}')
    result = json.loads(lines[-1][len('RESULT '):])
    return {'code': name, 'round': r, 'seconds': result['seconds'], 'texts': len(result['answers']),
            'answers': result['answers'], 'peak_rss_gb': done.peak_rss_gb}

  runs = alternate(codes, args.rounds, run, args.out, {'config': args.config})
  first = runs[0]['answers']
  print(f'\n{args.config}: notes on {runs[0]["texts"]} texts')
  print('| code | round | seconds | answers | differ from the first run |')
  print('|---|---:|---:|---|---:|')
  for row in runs:
    counts = collections.Counter(row['answers'].values()).most_common()
    differ = sum(row['answers'].get(t) != a for t, a in first.items())
    print(f'| {row["code"]} | {row["round"]} | {row["seconds"]:.1f} | '
          + ', '.join(f'{a} {n}' for a, n in counts) + f' | {differ} |')


if __name__ == '__main__':
  main()
