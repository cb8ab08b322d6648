"""Join the labels files of a batch job split over workers into one, each feature once.

    python -m tokenspace_jax.outputs.merge --out=labels.jsonl WORKDIR_0 WORKDIR_1 ...

Worker ``i`` of ``n`` (``--config.batch.shard=i --config.batch.num_shards=n``) labels features
``i, i + n, i + 2n, ...`` of the records file into its own workdir. The merge checks that the
workers ran the same job (their configs agree but for the shard index, on the same inputs),
that every shard is there, and that no feature was labeled twice; then it writes the lines in
the records file's order, as one uninterrupted job would have. A worker still running (or one
that was stopped) makes the merge refuse, naming the shards that are short of lines, unless
``--partial`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tokenspace_jax.outputs import storage


class MergeError(ValueError):
  """Workers' outputs that do not form one job; the message says which and why."""


def _read(path: str, name: str):
  try:
    with open(os.path.join(path, name), encoding='utf-8') as f:
      return f.read()
  except FileNotFoundError:
    raise MergeError(f'{path} has no {name}: not a batch workdir (or the worker never '
                     'started).') from None


def _lines(text: str) -> list[dict]:
  complete = text[:text.rfind('\n') + 1]  # a last line cut short by a kill is not a line
  return [json.loads(x) for x in complete.splitlines() if x.strip()]


def merge(workdirs: list[str], partial: bool = False) -> list[dict]:
  """The merged lines of the workers in ``workdirs``, in the records file's feature order."""
  shards = {}
  for path in workdirs:
    owed = json.loads(_read(path, 'features.json'))
    config = json.loads(_read(path, 'config.json'))
    i = owed['shard']
    if i in shards:
      raise MergeError(f'{path} and {shards[i]["path"]} are both shard {i}.')
    job = {**config, 'batch': {**config.get('batch', {}), 'shard': 0}}
    shards[i] = {'path': path, 'owed': owed, 'job': job, 'lines': _lines(_read(path,
                                                                               'labels.jsonl')),
                 'inputs': _read(path, 'inputs.json')}
  first = next(iter(shards.values()))
  n, total = first['owed']['num_shards'], first['owed']['total']
  for s in shards.values():
    if ((s['owed']['num_shards'], s['owed']['total']) != (n, total) or s['job'] != first['job']
        or s['inputs'] != first['inputs']):
      raise MergeError(f'{s["path"]} ran another job than {first["path"]} (its config or inputs '
                       'differ beyond batch.shard): merge only the workers of one job.')
  missing = sorted(set(range(n)) - set(shards))
  if missing:
    raise MergeError(f'Shards {missing} of {n} are missing: pass every worker\'s workdir.')
  position, out, short = {}, {}, []
  for i, s in sorted(shards.items()):
    for k, fid in enumerate(s['owed']['feature_ids']):
      position[json.dumps(fid)] = i + k * n  # worker i labels features i, i + n, ...
  for i, s in sorted(shards.items()):
    done = {json.dumps(line['feature_id']): line for line in s['lines']}
    if len(done) < len(s['owed']['feature_ids']):
      short.append(i)
    for key, line in done.items():
      if key not in position:
        raise MergeError(f'{s["path"]} holds feature {line["feature_id"]!r}, which no worker '
                         'owes: the workdirs are of different jobs.')
      if position[key] in out:
        raise MergeError(f'Feature {line["feature_id"]!r} is labeled twice.')
      out[position[key]] = line
  if short and not partial:
    raise MergeError(f'Shards {short} have not labeled all their features yet: are those workers '
                     'still running? Rerun them to finish, or pass --partial.')
  return [out[p] for p in sorted(out)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdirs', nargs='+', help="every worker's --workdir")
  parser.add_argument('--out', required=True, help='the merged labels.jsonl')
  parser.add_argument('--partial', action='store_true',
                      help='merge what the workers have written so far')
  args = parser.parse_args(argv)
  try:
    lines = merge(args.workdirs, args.partial)
    storage.atomic_write_text(args.out, ''.join(json.dumps(x, ensure_ascii=False) + '\n'
                                                for x in lines))
  except (MergeError, json.JSONDecodeError, storage.StorageError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{len(lines)} features from {len(args.workdirs)} workers in {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
