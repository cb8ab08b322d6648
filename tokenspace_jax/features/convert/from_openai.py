"""OpenAI automated-interpretability ``NeuronRecord`` files (``neuron_explainer``) to records.

One JSON object per neuron (``neurons/{layer}/{neuron}.json`` in their dataset)::

  {"neuron_id": {"layer_index": 5, "neuron_index": 131},
   "most_positive_activation_records": [{"tokens": [...], "activations": [...]}, ...],
   "random_sample": [...], "random_sample_by_quantile": [[...], ...], ...}

Every activation record of the three lists becomes one record of feature ``"{layer}/{neuron}"``
(duplicates across the lists once). The top records alone would leave a label no texts where the
neuron is silent, so the random samples are kept as the negatives; a file without them is
converted with a warning. Their ``dataclass_name`` keys and summary statistics are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator

from tokenspace_jax.features.convert import token_records as tr
from tokenspace_jax.features.convert.report import Conversion, Report
from tokenspace_jax.features.example import FeatureError

_LISTS = ('most_positive_activation_records', 'random_sample', 'random_sample_by_quantile')


def openai(paths: list[str] | str) -> Conversion:
  """Records of the NeuronRecord files (or folders of them) in ``paths``."""
  files = tr.expand(paths, ('.json', '.json.gz'))
  return Conversion('openai', lambda report: _produce(files, report))


def _produce(files: list[str], report: Report) -> Iterator[dict]:
  dedupe = tr.Deduplicator()
  for path in files:
    try:
      neuron = tr.load_json(tr.read_bytes(path), path)
      layer, index = _neuron_id(neuron, path)
    except FeatureError as e:
      report.skip(str(e), record=path)
      continue
    fid = f'{layer}/{index}'
    source = {'format': 'openai', 'layer_index': layer, 'neuron_index': index}
    written = negatives = 0
    for label, top, rec in _activation_records(neuron, path, report, fid):
      where = f'{path} {label}'
      try:
        out = tr.token_record(fid, tr.strings(rec.get('tokens'), 'tokens', where),
                              tr.numbers(rec.get('activations'), 'activations', where), where,
                              source=source)
      except FeatureError as e:
        report.skip(str(e), fid, where)
        continue
      if not dedupe.is_new(out):
        report.skip('the same tokens and activations as an earlier record of this neuron.', fid,
                    where)
        continue
      written += 1
      negatives += not top
      yield out
    if not written:
      report.skip('no usable activation record.', fid, path)
    elif not negatives:
      report.warn('only most_positive_activation_records and no random sample: the negatives '
                  'are the other tokens of those texts, so a label may describe the texts '
                  'rather than the neuron.', fid)


def _neuron_id(neuron, path: str) -> tuple[int, int]:
  if not isinstance(neuron, dict):
    raise FeatureError(f'{path}: not a NeuronRecord (a JSON object with "neuron_id").')
  nid = neuron.get('neuron_id')
  layer = nid.get('layer_index') if isinstance(nid, dict) else None
  index = nid.get('neuron_index') if isinstance(nid, dict) else None
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, index)):
    raise FeatureError(f'{path}: no "neuron_id" with integer "layer_index" and "neuron_index", '
                       'so the neuron cannot be named; is this a neuron_explainer NeuronRecord?')
  if not any(neuron.get(k) for k in _LISTS):
    raise FeatureError(f'{path}: no activation records (none of {", ".join(_LISTS)}).')
  return layer, index


def _activation_records(neuron: dict, path: str, report: Report, fid: str):
  """``(where in the file, from the top list?, record)`` of each activation record."""
  for name in _LISTS:
    value = neuron.get(name) or []
    if not isinstance(value, list):
      report.skip(f'"{name}" is not a list of activation records.', fid, path)
      continue
    if name == 'random_sample_by_quantile':
      items = [(f'{name}[{q}][{j}]', rec) for q, quantile in enumerate(value)
               if isinstance(quantile, list) for j, rec in enumerate(quantile)]
    else:
      items = [(f'{name}[{i}]', rec) for i, rec in enumerate(value)]
    for label, rec in items:
      if isinstance(rec, dict):
        yield label, name == _LISTS[0], rec
      else:
        report.skip(f'not an activation record ({type(rec).__name__}).', fid, f'{path} {label}')
