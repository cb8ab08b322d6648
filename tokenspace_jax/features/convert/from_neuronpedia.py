"""Neuronpedia features to records: the feature API's JSON and the bulk exports.

Three shapes are read, told apart by their keys:

* a feature, as ``/api/feature/{modelId}/{layer}/{index}`` returns it (or a JSON list of them):
  ``{"modelId", "layer", "index", "activations": [{"tokens", "values", ...}],
  "explanations": [{"description", ...}]}``;
* lines of an activations export (``{modelId}/{layer}/activations/batch-N.jsonl.gz``), one
  activation record each: ``{"modelId", "layer", "index", "tokens", "values", "maxValue", ...}``;
* lines of an explanations export (``.../explanations/batch-N.jsonl.gz``):
  ``{"modelId", "layer", "index", "description", ...}``. These are read first, whatever the
  order of the inputs, so the first record of each feature can carry its description.

Each activation record is one record of feature ``"{modelId}/{layer}/{index}"``. Tokens may keep
their tokenizer's markers (``Ġ``, ``Ċ``, ``▁``); they are undone or the record is skipped.
Neuronpedia lists the contexts where a feature fires most (and by activation quantile), so a
feature whose every record fires gets a warning: its negatives are only the other tokens of
those texts. The first explanation's description is kept as ``explanation`` (a sentence, not a
reference word).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tokenspace_jax.features.convert import token_records as tr
from tokenspace_jax.features.convert.report import Conversion, Report
from tokenspace_jax.features.example import FeatureError

_SUFFIXES = ('.json', '.jsonl', '.json.gz', '.jsonl.gz')


def neuronpedia(paths: list[str] | str) -> Conversion:
  """Records of the Neuronpedia files (or folders of them) in ``paths``."""
  files = tr.expand(paths, _SUFFIXES)
  return Conversion('neuronpedia', lambda report: _produce(files, report))


def _produce(files: list[str], report: Report) -> Iterator[dict]:
  explanations: dict[str, str] = {}
  record_files = []
  for path in files:  # Explanation files first, so each feature's first record can carry one.
    try:
      objects = _objects(path)
    except FeatureError as e:
      report.skip(str(e), record=path)
      continue
    if objects and _is_explanation(objects[0][1]):
      for where, obj in objects:
        if not _is_explanation(obj):
          report.skip(str(obj) if isinstance(obj, FeatureError) else
                      'not an explanation, in a file of explanations.', record=where)
          continue
        try:
          fid, _ = _feature(obj, where)
        except FeatureError as e:
          report.skip(str(e), record=where)
          continue
        if isinstance(obj['description'], str) and obj['description'].strip():
          explanations.setdefault(fid, obj['description'].strip())
    else:
      record_files.append(path)

  dedupe = tr.Deduplicator()
  firing: dict[str, bool] = {}  # feature -> has a record where it does not fire
  for path in record_files:  # Read again, one at a time: activation exports are large.
    for where, obj in _objects(path):
      if isinstance(obj, FeatureError):
        report.skip(str(obj), record=where)
      elif not isinstance(obj, dict):
        report.skip(f'not a JSON object ({type(obj).__name__}).', record=where)
      elif isinstance(obj.get('activations'), list):
        yield from _feature_records(obj, where, explanations, dedupe, firing, report)
      elif 'values' in obj:
        yield from _records(obj, [(where, obj)], explanations, dedupe, firing, report)
      elif not _is_explanation(obj):
        report.skip('neither a feature (with "activations"), an activation (with "tokens" and '
                    '"values") nor an explanation (with "description").', record=where)
  for fid, has_negative in firing.items():
    if not has_negative:
      report.warn('every record fires (Neuronpedia lists top activations): the negatives are '
                  'the other tokens of those texts, so a label may describe the texts rather '
                  'than the feature.', fid)


def _is_explanation(obj: Any) -> bool:
  return isinstance(obj, dict) and 'description' in obj and 'values' not in obj and (
      'activations' not in obj)


def _objects(path: str) -> list[tuple[str, Any]]:
  """``(where, object or FeatureError)`` of a file: one JSON value (a feature, or a list of
  them) or JSON Lines."""
  data = tr.read_bytes(path)
  if data.lstrip().startswith(b'['):
    value = tr.load_json(data, path)
    return [(f'{path} [{i}]', v) for i, v in enumerate(value)]
  try:
    return [(path, tr.load_json(data, path))]
  except FeatureError:
    return list(tr.json_lines(data, path))


def _feature(obj: dict, where: str) -> tuple[str, dict]:
  model, layer, index = obj.get('modelId'), obj.get('layer'), obj.get('index')
  if not (isinstance(model, str) and isinstance(layer, str)
          and isinstance(index, (str, int)) and not isinstance(index, bool)):
    raise FeatureError(f'{where}: no "modelId", "layer" and "index" naming the feature; is this '
                       'a Neuronpedia feature, activation or explanation?')
  return (f'{model}/{layer}/{index}',
          {'format': 'neuronpedia', 'modelId': model, 'layer': layer, 'index': str(index)})


def _feature_records(obj: dict, where: str, explanations: dict, dedupe, firing: dict,
                     report: Report) -> Iterator[dict]:
  try:
    fid, _ = _feature(obj, where)
  except FeatureError as e:
    report.skip(str(e), record=where)
    return
  for e in obj.get('explanations') or []:
    if isinstance(e, dict) and isinstance(e.get('description'), str) and e['description'].strip():
      explanations.setdefault(fid, e['description'].strip())
      break
  acts = [(f'{where} activations[{i}]', a) for i, a in enumerate(obj['activations'])]
  if not acts:
    report.skip('the feature lists no activations.', fid, where)
  yield from _records(obj, acts, explanations, dedupe, firing, report)


def _records(feature: dict, acts: list, explanations: dict, dedupe, firing: dict,
             report: Report) -> Iterator[dict]:
  try:
    fid, source = _feature(feature, acts[0][0] if acts else '')
  except FeatureError as e:
    report.skip(str(e), record=acts[0][0] if acts else None)
    return
  for where, act in acts:
    if not isinstance(act, dict):
      report.skip(f'not an activation record ({type(act).__name__}).', fid, where)
      continue
    try:
      rec = tr.token_record(fid, tr.strings(act.get('tokens'), 'tokens', where),
                            tr.numbers(act.get('values'), 'values', where), where,
                            source=source)
    except FeatureError as e:
      report.skip(str(e), fid, where)
      continue
    if not dedupe.is_new(rec):
      report.skip('the same tokens and values as an earlier record of this feature.', fid, where)
      continue
    first = fid not in firing
    firing[fid] = firing.get(fid, False) or not tr.fires(rec)
    if first and fid in explanations:
      rec['explanation'] = explanations[fid]
    yield rec
