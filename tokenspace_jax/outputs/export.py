"""Found labels written in the formats of the tools the features came from.

    python -m tokenspace_jax.outputs.export --format=delphi|neuronpedia|openai \\
        --labels=DIR/labels.jsonl --out=OUTDIR

A batch job's ``labels.jsonl`` names each feature by its ``feature_id`` and, when its records
came through :mod:`tokenspace_jax.features.convert`, by its ``source`` object: the tool's own
terms, which each export needs.

* ``delphi``: ``OUTDIR/explanations/{hookpoint}_latent{index}.txt`` holding the label as a JSON
  string, the file delphi's explainer writes (``str(Latent)``, ``orjson.dumps(explanation)``)
  and ``--explainer none`` reads back, so delphi's scorers score our labels: point ``OUTDIR``
  at ``results/{run name}``.
* ``neuronpedia``: ``OUTDIR/{modelId}/{layer}/{index}.json``, an explanation as Neuronpedia
  stores one (``modelId``, ``layer``, ``index``, ``description``, ``explanationModelName``,
  ``typeName``) with our scores (held-out AUROCs, window-level detection and correlation; a
  score the run could not compute is left out), the verdict and the held-out sizes.
* ``openai``: ``OUTDIR/{layer}/{neuron}.jsonl``, one ``NeuronSimulationResults`` line as
  ``neuron_explainer.explanations.explanations.load_neuron_explanations`` reads it.

Without a ``source``, the ``feature_id`` is read as the tool writes names
(``{hookpoint}_latent{i}``, ``{modelId}/{layer}/{index}``, ``{layer}/{neuron}``). Lines with an
``error`` (features that failed), without a label, or whose feature cannot be named in the
format are skipped and reported; nothing is written for them. NaN in a labels line (Python's
json writes it, no other reader accepts it) is written as null.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any

FORMATS = ('delphi', 'neuronpedia', 'openai')
EXPLANATION_MODEL = 'tokenspace-jax'
EXPLANATION_TYPE = 'tokenspace-jax token-space descent'


class ExportError(ValueError):
  """A labels file or an output folder that cannot be used; the message names the fix."""


@dataclasses.dataclass
class ExportReport:
  format: str
  written: list[str] = dataclasses.field(default_factory=list)
  skipped: list[tuple[Any, str]] = dataclasses.field(default_factory=list)  # (feature, why)
  not_identifiable: int = 0

  def summary(self, limit: int = 10) -> str:
    lines = [f'{self.format}: {len(self.written)} labels written'
             + (f', {self.not_identifiable} of them not identifiable (see their verdicts)'
                if self.not_identifiable else '') + '.']
    if self.skipped:
      lines.append(f'{len(self.skipped)} skipped:')
      lines += [f'  {fid!r}: {why}' for fid, why in self.skipped[:limit]]
      if len(self.skipped) > limit:
        lines.append(f'  ... and {len(self.skipped) - limit} more.')
    return '\n'.join(lines)


def read_labels(path: str) -> tuple[list[dict], list[tuple[Any, str]]]:
  """The usable lines of a labels file, and ``(feature_id or line, why)`` of the others."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ExportError(f'{path}: cannot be read ({e.strerror}); pass the labels.jsonl a batch '
                      'job wrote.') from None
  lines, skipped = [], []
  for lineno, raw in enumerate(data.split(b'\n'), start=1):
    if not raw.strip():
      continue
    try:
      line = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, ValueError, RecursionError):
      skipped.append((f'line {lineno}', 'not a JSON object (cut short by a kill, or edited?).'))
      continue
    if not isinstance(line, dict) or 'feature_id' not in line:
      skipped.append((f'line {lineno}', 'no feature_id.'))
    elif line.get('error'):
      skipped.append((line['feature_id'], f'the feature failed: {str(line["error"])[:200]}'))
    elif not isinstance(line.get('label'), str) or not line['label'].strip():
      skipped.append((line['feature_id'], 'no label (an empty or missing "label").'))
    else:
      lines.append(line)
  if not lines and not skipped:
    raise ExportError(f'{path}: empty; run the batch job first.')
  return lines, skipped


def _source(line: dict) -> dict:
  source = line.get('source')
  return source if isinstance(source, dict) else {}


def delphi_name(line: dict) -> str | None:
  """delphi's ``str(Latent)`` of the feature: ``{hookpoint}_latent{index}``."""
  src = _source(line)
  if isinstance(src.get('hookpoint'), str) and isinstance(src.get('latent'), int):
    return f'{src["hookpoint"]}_latent{src["latent"]}'
  fid = line['feature_id']
  if isinstance(fid, str) and re.fullmatch(r'.+_latent\d+', fid):
    return fid
  return None


def neuronpedia_name(line: dict) -> tuple[str, str, str] | None:
  """``(modelId, layer, index)`` of the feature."""
  src = _source(line)
  index = src.get('index', src.get('latent'))
  if isinstance(src.get('modelId'), str) and isinstance(src.get('layer'), str) and (
      isinstance(index, (int, str)) and not isinstance(index, bool)):
    return src['modelId'], src['layer'], str(index)
  fid = line['feature_id']
  parts = fid.split('/') if isinstance(fid, str) else []
  return tuple(parts) if len(parts) == 3 and all(parts) else None


def openai_name(line: dict) -> tuple[int, int] | None:
  """``(layer_index, neuron_index)`` of the neuron."""
  src = _source(line)
  layer, neuron = src.get('layer_index'), src.get('neuron_index')
  if isinstance(layer, int) and isinstance(neuron, int):
    return layer, neuron
  fid = line['feature_id']
  m = re.fullmatch(r'(\d+)/(\d+)', fid) if isinstance(fid, str) else None
  return (int(m.group(1)), int(m.group(2))) if m else None


def description(line: dict) -> str:
  """The label as a tool shows it: without the leading space the prompt's slot gives tokens."""
  return line['label'].strip()


# Sizes, not scores: ``scores.detection`` of a labels line counts its held-out windows.
COUNTS = ('windows', 'positive_windows')


def _finite(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _numbers(prefix: str, value: Any) -> dict:
  """The finite numbers of a (nested) dict, keyed by their path: ``detection_auroc``, ...; a
  score the run could not compute (NaN: every held-out window positive, a constant margin) is
  left out, as a missing reference word is."""
  if _finite(value):
    return {prefix: value}
  if isinstance(value, dict):
    return {k: v for key, sub in value.items() if key not in COUNTS
            for k, v in _numbers(f'{prefix}_{key}' if prefix else str(key), sub).items()}
  return {}


def _scores(line: dict) -> dict:
  """Our numbers, flat: held-out AUROCs of the found, reference and random labels
  (``auroc_found``, ...), and the window-level ``scores`` (``detection_auroc``, ``correlation``,
  ...) when the run computed them."""
  return {**_numbers('auroc', line.get('auroc')), **_numbers('', line.get('scores'))}


def _heldout_sizes(line: dict) -> dict:
  """What the scores were computed on: held-out examples and positives, and windows."""
  held = line.get('heldout') if isinstance(line.get('heldout'), dict) else {}
  scores = line.get('scores') if isinstance(line.get('scores'), dict) else {}
  detection = scores.get('detection') if isinstance(scores.get('detection'), dict) else {}
  return {k: v for k, v in {**{k: held.get(k) for k in ('examples', 'positives')},
                            **{k: detection.get(k) for k in COUNTS}}.items() if _finite(v)}


def _json_safe(value: Any) -> Any:
  """``value`` with NaN and infinities as null: labels.jsonl is written by Python's json, which
  spells them ``NaN``, a token no other JSON reader (Neuronpedia's JavaScript, orjson) accepts."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value


def _write_json(path: str, value: Any, lines: bool = False) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(json.dumps(_json_safe(value), ensure_ascii=False, allow_nan=False)
            + ('\n' if lines else ''))


def export_delphi(lines: list[dict], out: str, report: ExportReport) -> None:
  for line in lines:
    name = delphi_name(line)
    if name is None:
      report.skipped.append((line['feature_id'], 'no delphi hookpoint and latent (a source of '
                             'format delphi, or a feature_id "{hookpoint}_latent{i}").'))
      continue
    if '..' in name.split('/'):
      report.skipped.append((line['feature_id'], f'{name!r} cannot be a file name.'))
      continue
    path = os.path.join(out, 'explanations', f'{name}.txt')  # a "/" in it: delphi's too
    _write_json(path, description(line))
    report.written.append(path)


def export_neuronpedia(lines: list[dict], out: str, report: ExportReport,
                       model_name: str = EXPLANATION_MODEL) -> None:
  for line in lines:
    name = neuronpedia_name(line)
    if name is None:
      report.skipped.append((line['feature_id'], 'no Neuronpedia modelId, layer and index (a '
                             'source of format neuronpedia, or a feature_id '
                             '"{modelId}/{layer}/{index}").'))
      continue
    model, layer, index = name
    if any(part in ('.', '..') or '/' in part or os.sep in part for part in name):
      report.skipped.append((line['feature_id'], f'{name!r} cannot be a file name.'))
      continue
    scores = _scores(line)
    explanation = {
        'modelId': model, 'layer': layer, 'index': index, 'description': description(line),
        'explanationModelName': model_name, 'typeName': EXPLANATION_TYPE,
        'scores': [{'explanationScoreTypeName': f'tokenspace-jax {k}', 'value': v}
                   for k, v in scores.items()],
        'identifiable': line.get('identifiable'), 'verdict_status': line.get('verdict_status'),
        'verdict': line.get('verdict'), 'heldout': _heldout_sizes(line),
        'token_id': line.get('token_id'), 'probability': line.get('probability')}
    path = os.path.join(out, model, layer, f'{index}.json')
    _write_json(path, explanation)
    report.written.append(path)


def export_openai(lines: list[dict], out: str, report: ExportReport) -> None:
  for line in lines:
    name = openai_name(line)
    if name is None:
      report.skipped.append((line['feature_id'], 'no OpenAI layer_index and neuron_index (a '
                             'source of format openai, or a feature_id "{layer}/{neuron}").'))
      continue
    layer, neuron = name
    scores = line.get('scores') if isinstance(line.get('scores'), dict) else {}
    correlation = scores.get('correlation')
    results = {
        'dataclass_name': 'NeuronSimulationResults',
        'neuron_id': {'dataclass_name': 'NeuronId', 'layer_index': layer,
                      'neuron_index': neuron},
        'scored_explanations': [{
            'dataclass_name': 'ScoredExplanation', 'explanation': description(line),
            'scored_simulation': {
                'dataclass_name': 'ScoredSimulation', 'scored_sequence_simulations': [],
                'ev_correlation_score': correlation if _finite(correlation) else None,
                'rsquared_score': None,
                'absolute_dev_explained_score': None}}]}
    path = os.path.join(out, str(layer), f'{neuron}.jsonl')
    _write_json(path, results, lines=True)
    report.written.append(path)


def export(fmt: str, labels: str, out: str, *, identifiable_only: bool = False,
           explanation_model_name: str = EXPLANATION_MODEL) -> ExportReport:
  """Writes the labels of ``labels`` (a labels.jsonl) under ``out`` in format ``fmt``."""
  if fmt not in FORMATS:
    raise ExportError(f'Unknown export format {fmt!r}; use one of {", ".join(FORMATS)}.')
  lines, skipped = read_labels(labels)
  report = ExportReport(fmt, skipped=skipped)
  if identifiable_only:
    report.skipped += [(line['feature_id'], 'not identifiable (--identifiable_only).')
                       for line in lines if line.get('identifiable') is False]
    lines = [line for line in lines if line.get('identifiable') is not False]
  report.not_identifiable = sum(line.get('identifiable') is False for line in lines)
  try:
    if fmt == 'delphi':
      export_delphi(lines, out, report)
    elif fmt == 'neuronpedia':
      export_neuronpedia(lines, out, report, explanation_model_name)
    else:
      export_openai(lines, out, report)
  except OSError as e:
    raise ExportError(f'{out}: cannot write there ({e.strerror}); pass a writable --out.'
                      ) from None
  return report


def main(argv: list[str] | None = None) -> int:
  class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
      self.exit(2, f'error: {message} (see --help)\n')

  p = Parser(prog='python -m tokenspace_jax.outputs.export',
             description='Write found labels for delphi, Neuronpedia or OpenAI tools.')
  p.add_argument('--format', required=True, choices=FORMATS)
  p.add_argument('--labels', required=True, help='a batch job\'s labels.jsonl')
  p.add_argument('--out', required=True, help='the folder to write into')
  p.add_argument('--identifiable_only', action='store_true',
                 help='skip labels whose verdict is not identifiable')
  p.add_argument('--explanation_model_name', default=EXPLANATION_MODEL,
                 help='Neuronpedia\'s explanationModelName, e.g. the labeling model')
  try:
    args = p.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  try:
    report = export(args.format, args.labels, args.out, identifiable_only=args.identifiable_only,
                    explanation_model_name=args.explanation_model_name)
  except ExportError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(report.summary())
  return 0 if report.written else 2


if __name__ == '__main__':
  sys.exit(main())
