"""What the commands write, each a thin view of the engine's row records (``engine.record``).

* ``result_view``: ``result.json`` of a single run, its one row's record plus the run's
  timings, model and config;
* ``sweep_view``: ``sweep.json`` of a run with several rows, every row's record, which rows
  agree, and the best row (by training AUROC);
* ``labels_line``: a feature's line of the batch job's ``labels.jsonl``, its best row.
"""

from __future__ import annotations

import json

from ml_collections import ConfigDict


def _interval(c, sign: str = '') -> str:
  return f'[{c[0]:{sign}.3f}, {c[1]:{sign}.3f}]' if c else ''


def _close(second: dict) -> bool:
  """Whether the final choice's runner-up is within noise of the label on the training
  examples: the paired interval of their difference reaches zero (with no interval, a tie)."""
  c = second['difference_interval']
  return c[0] <= 0 if c else second['difference'] <= 0


def result_view(record: dict, *, config: ConfigDict, model: str, timings: dict) -> dict:
  return {**record, **timings, 'model': model, 'config': json.loads(config.to_json())}


def sweep_view(records: list[dict], best: dict, *, config: ConfigDict, model: str,
               timings: dict) -> dict:
  agreement = {}
  for r in records:
    agreement.setdefault(r['label'], []).append(r['row'])
  baselines = [s for s in best['heldout'].get('scores', []) if s['role'] != 'found']
  return {'feature': best['feature'], 'rows': records,
          'agreement': dict(sorted(agreement.items(), key=lambda kv: -len(kv[1]))),
          'best_row': best['row'], 'best_label': best['label'], 'baselines': baselines,
          'verdict': best['heldout'].get('verdict'), **timings, 'model': model,
          'config': json.loads(config.to_json())}


def labels_line(record: dict, feature_id, source: dict | None = None) -> dict:
  """The best row of a feature as a line of labels.jsonl."""
  line = {'feature_id': feature_id}
  if 'error' in record:
    return {**line, 'steps': record['steps'], 'error': record['error']}
  scores = record['heldout']['scores']
  found = scores[0]
  reference = next((s for s in scores if s['role'] == 'reference'), None)
  verdict = record['heldout']['verdict']
  line.update({
      'label': record['label'], 'token_id': record['token_id'],
      'probability': record['probability'], 'top5': record['top10'][:5],
      'descent_label': record['descent_label'], 'train_auroc': record['train_auroc'],
      'auroc': {'found': found['auroc'], 'found_interval': found['auroc_interval'],
                'reference': reference['auroc'] if reference else None,
                'random_mean': verdict['random_auroc_mean']},
      'scores': {'detection': found['detection'], 'correlation': found['correlation'],
                 'balanced_accuracy': found['balanced_accuracy']},
      'identifiable': record['identifiable'], 'verdict_status': verdict['status'],
      'verdict': record['verdict'], 'reference_word': record['reference_word'],
      'heldout': record['heldout'], 'train': record['train'], 'choice': record['choice'],
      'row': record['row'], 'steps': record['steps'], 'stopped_early': record['stopped_early'],
      'final_loss': record['final_losses'].get('loss')})
  if source:
    line['source'] = source
  return line


def summary(result: dict) -> str:
  """A few lines for the terminal: the label, the evidence, and the verdict."""
  r = result
  p = f'p={r["probability"]:.3f}' if r.get('probability') is not None else 'p=-'
  changed = r['choice']['changed']
  if changed:  # its probability is the descent's, which ended elsewhere (the next line)
    p += ' under the descent'
  lines = [f'Feature {r["feature"]!r}: label {r["label"]!r} ({p}, {r["steps"]} steps, '
           f'{r.get("wall_seconds", 0):.0f} s)']
  if changed:
    lines.append(f'  (descent ended on {r["descent_label"]!r}, p='
                 f'{r["descent_probability"]:.3f}; the final choice on training examples '
                 f'picked {r["label"]!r})')
  second = r['choice'].get('runner_up')  # absent from records written before it was kept
  if second and _close(second):
    lines.append(f'  (a close choice: {second["token"]!r} scores {second["train_auroc"]:.3f} on '
                 f'the same {r["choice"]["examples"]} training examples, difference '
                 f'{second["difference"]:+.3f} {_interval(second["difference_interval"], "+")})')
  if r.get('notes'):  # prompt.note: what the judge read off the texts, which its answers used
    read = ', '.join(f'{answer} {count}' for answer, count in r['notes'].items())
    lines.append(f'  (the judge read the texts as: {read})')
  lines.append('  held-out    token                 AUROC  interval          bal.acc  window')
  for s in r['heldout']['scores']:
    lines.append(f'  {s["role"]:<10}  {s["token"]!r:<20} {s["auroc"]:6.3f}  '
                 f'{_interval(s["auroc_interval"]):<16}  {s["balanced_accuracy"]:6.3f}  '
                 f'{s["detection"]["auroc"]:6.3f}')
  lines.append('  ' + r['verdict'])
  return '\n'.join(lines)


def sweep_summary(result: dict) -> str:
  lines = [f'Sweep of feature {result["feature"]!r}: {len(result["rows"])} label rows',
           '  row restart      lr  w_ent   w_kl  label                     p  p>=0.9 at  '
           'train  held-out']
  for r in result['rows']:
    if 'error' in r:
      lines.append(f'  {r["row"]:3d} {r["restart"]:7d} {r["lr"]:7.3g}  non-finite: stopped at '
                   f'step {r["steps"]}')
      continue
    held = r['heldout']['scores'][0]['auroc']
    p = f'{r["probability"]:5.2f}' if r['probability'] is not None else '    -'
    lines.append(f'  {r["row"]:3d} {r["restart"]:7d} {r["lr"]:7.3g} {r["w_entropy"]:6.3g} '
                 f'{r["w_kl"]:6.3g}  {r["label"]!r:<22} {p}  '
                 f'{r["steps_to_p90"] or "-":>9}  {r["train_auroc"]:.3f}  {held:.3f}')
  for s in result['baselines']:
    lines.append(f'  {s["role"]:<10} {s["token"]!r:<22} AUROC {s["auroc"]:.3f}')
  agree = ', '.join(f'{label!r}: rows {rows}' for label, rows in result['agreement'].items())
  lines.append(f'  agreement: {agree}')
  if result['verdict']:
    lines.append(f'  best row {result["best_row"]} (by training AUROC): '
                 + result['verdict']['message'])
  return '\n'.join(lines)
