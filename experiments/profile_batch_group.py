"""Where a batch job's group of features spends its time: prefix pass, contrast baselines,
descent, final choice and held-out scores, and how many label × example pairs each scores.

    python experiments/profile_batch_group.py [--records /tmp/four_features.jsonl] [--arg ARG]

Each group of ``batch.features_per_step`` features of the records file is labeled as the batch
job labels it (``engine.run.label_features``, the same config, no files written), with timers
around the engine's own functions: ``prefix.prefix_caches`` (the prefix pass),
``pool.contrast_baseline`` (every example's margin under the contrast labels),
``LabelScorer.training_aurocs`` (the final choice's candidates on the training examples) and
``LabelScorer.score`` (the found, reference and random labels on the calibration and held-out
examples). A pair is one label in the slot of one example's cached prompt: one forward pass of
the tail, what the scoring's time is made of.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--records', default='/tmp/four_features.jsonl')
  parser.add_argument('--arg', default='', help='the argument of configs/batch.py')
  args = parser.parse_args()

  import jax
  import numpy as np

  from tokenspace_jax.classifier import prefix
  from tokenspace_jax.engine import pool as pool_lib
  from tokenspace_jax.engine import run as run_lib
  from tokenspace_jax.engine import scoring
  from tokenspace_jax.features.grouped_records import read_grouped_records
  from tokenspace_jax.features.synthetic_records import write_synthetic_records
  from tokenspace_jax.outputs.checkpoint import StopFlag

  spec = importlib.util.spec_from_file_location('batch_config',
                                                os.path.join(ROOT, 'configs', 'batch.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(args.arg or None)
  if not os.path.exists(args.records):
    write_synthetic_records(args.records)

  seconds, pairs = collections.Counter(), collections.Counter()

  def timed(owner, name, key, ready=lambda r: r):
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*a, **k):
      start = time.perf_counter()
      result = original(*a, **k)
      jax.block_until_ready(ready(result))
      seconds[key] += time.perf_counter() - start
      return result
    setattr(owner, name, wrapper)

  timed(prefix, 'prefix_caches', 'prefix pass')
  timed(pool_lib, 'contrast_baseline', 'contrast baselines', lambda r: r[0])
  timed(scoring.LabelScorer, 'training_aurocs', 'final choice')
  timed(scoring.LabelScorer, 'score', 'held-out scores', lambda r: 0)
  margins = scoring.LabelScorer.margins

  def counted(self, labels, slots):  # pairs actually run: known or seen margins are looked up
    for x in labels:
      key = scoring.label_key(list(np.atleast_1d(np.asarray(x, np.int64))))
      if key in self.known:
        continue
      seen = self._seen.get(key)
      pairs[_caller()] += (len(slots) if seen is None
                           else int(np.isnan(seen[np.asarray(slots)]).sum()))
    return margins(self, labels, slots)
  scoring.LabelScorer.margins = counted

  lm = run_lib.load_for(config, None)
  f = config.feature
  grouped = read_grouped_records(args.records, lm.tokenizer, threshold=f.threshold,
                                 reference_word=f.reference_word,
                                 heldout_fraction=f.heldout_fraction, seed=f.split_seed,
                                 window=f.window, vocab_size=lm.config.vocab_size)
  size = config.batch.features_per_step
  rows = []
  for i in range(0, len(grouped.features), size):
    seconds.clear()
    pairs.clear()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
      labeled = run_lib.label_features(config, lm, grouped.features[i:i + size],
                                       checkpoints=directory, stop=StopFlag(), write=False)
    total = time.perf_counter() - start
    seconds['descent'] = labeled.seconds['descent']
    rows.append((', '.join(map(str, grouped.feature_ids[i:i + size])), total, dict(seconds),
                 dict(pairs), int(labeled.loop.state['t'])))
  keys = ['prefix pass', 'contrast baselines', 'descent', 'final choice', 'held-out scores']
  print(f'\n{args.records}, {size} features per group; seconds (label × example pairs)')
  print('| group | in all | ' + ' | '.join(keys) + ' | rest | steps |')
  print('|---|---:|' + '---:|' * (len(keys) + 2))
  for name, total, secs, n, steps in rows:
    cells = [f'{secs.get(k, 0):.1f}' + (f' ({n[k]})' if n.get(k) else '') for k in keys]
    rest = total - sum(secs.get(k, 0) for k in keys)
    print(f'| {name} | {total:.1f} | ' + ' | '.join(cells) + f' | {rest:.1f} | {steps} |')


def _caller() -> str:
  """Which timed phase a margins call belongs to, from the call stack."""
  frame = sys._getframe(2)
  while frame is not None:
    name = frame.f_code.co_name
    if name in ('contrast_baseline', 'training_aurocs', 'score'):
      return {'contrast_baseline': 'contrast baselines', 'training_aurocs': 'final choice',
              'score': 'held-out scores'}[name]
    frame = frame.f_back
  return 'other'


if __name__ == '__main__':
  main()
