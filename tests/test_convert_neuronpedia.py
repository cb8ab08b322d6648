"""Neuronpedia's feature JSON and bulk exports to records.

No package writes these files, so the fixtures are written from the field names of Neuronpedia's
own export code (``neuronpedia-utils``: ``db_models/activation.py``, ``db_models/explanation.py``,
``export-data.py``: one JSON object per line, gzipped as ``batch-N.jsonl.gz``) and of the
feature API (``/api/feature/{modelId}/{layer}/{index}``: the feature with ``activations`` and
``explanations`` lists).
"""

import gzip
import json

import pytest

from tokenspace_jax.features import convert, load_records
from tokenspace_jax.features.grouped_records import read_grouped_records


@pytest.fixture(scope='module')
def tokenizer():
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer
  return load_tokenizer(default_gguf_path())


def _activation(model, layer, index, tokens, values, **extra):
  return {'id': f'act-{index}-{len(tokens)}', 'tokens': tokens, 'index': str(index),
          'layer': layer, 'modelId': model, 'maxValue': max(values),
          'maxValueTokenIndex': values.index(max(values)), 'minValue': min(values),
          'values': values, 'creatorId': 'c', 'dataSource': None, 'dataIndex': None,
          'dfaValues': [], 'lossValues': [], **extra}


# GPT-2 style pieces as some exports keep them: Ġ for spaces, Ċ for newlines, and the two bytes
# of "é" as two symbols of the byte alphabet.
BPE_TOKENS = ['<|endoftext|>', 'The', 'Ġcaf', 'Ã', '©', 'Ġopened', 'Ċ', 'ĠParis', 'Ġcats']
BPE_VALUES = [12.0, 0.0, 3.0, 4.5, 1.0, 0.0, 0.0, 0.0, 0.0]
SP_TOKENS = ['▁Le', '▁chat', '▁dort', '.']
SP_VALUES = [0.0, 2.5, 0.0, 0.0]


def _feature_api(index='1234'):
  return {'modelId': 'gpt2-small', 'layer': '8-res-jb', 'index': index, 'maxActApprox': 4.5,
          'activations': [_activation('gpt2-small', '8-res-jb', index, BPE_TOKENS, BPE_VALUES),
                          _activation('gpt2-small', '8-res-jb', index, SP_TOKENS, SP_VALUES)],
          'explanations': [{'id': 'e1', 'description': ' coffee places and cafés',
                            'explanationModelName': 'gpt-4o-mini', 'typeName': 'oai_token-act-pair',
                            'scores': [{'value': 0.4}]}]}


def test_feature_api_json_markers_source_and_explanation(tmp_path, tokenizer):
  path = tmp_path / 'feature.json'
  path.write_text(json.dumps(_feature_api()), encoding='utf-8')
  conversion = convert.neuronpedia(str(path))
  records = list(conversion)
  assert [r['tokens'] for r in records] == [
      ['The', ' caf', 'é', ' opened', '\n', ' Paris', ' cats'], [' Le', ' chat', ' dort', '.']]
  assert records[0]['activations'] == [0.0, 3.0, 4.5, 0.0, 0.0, 0.0, 0.0]  # é: its bytes' max
  assert records[0]['explanation'] == 'coffee places and cafés'
  assert 'explanation' not in records[1]
  assert records[0]['source'] == {'format': 'neuronpedia', 'modelId': 'gpt2-small',
                                  'layer': '8-res-jb', 'index': '1234'}
  assert {r['feature_id'] for r in records} == {'gpt2-small/8-res-jb/1234'}
  (warning,) = conversion.report.warnings
  assert 'top activations' in warning.reason and not conversion.report.skipped

  out = tmp_path / 'records.jsonl'
  convert.write_records(convert.neuronpedia(str(path)), str(out))
  feature = load_records(str(out), tokenizer, threshold=1.0, heldout_fraction=0.0,
                         max_negatives_per_text=None)
  assert sorted((e.word, e.activation) for e in feature.train if e.target) == [
      ('café', 4.5), ('chat', 2.5)]
  assert feature.meta['explanation'] == 'coffee places and cafés'
  assert feature.meta['source']['index'] == '1234'


def _gz_lines(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(''.join(json.dumps(r) + '\n' for r in rows).encode()))
  return str(path)


def test_bulk_exports_with_explanations_read_first(tmp_path, tokenizer):
  model, layer = 'gemma-2-2b', '12-gemmascope-res-16k'
  rows = []
  for i in range(8):
    rows.append(_activation(model, layer, 7, ['▁I', '▁like', '▁red', '▁apples'],
                            [0.0, 0.0, 3.0 + i, 0.0]))
    rows.append(_activation(model, layer, 9, ['▁one', '▁two', '▁three'], [1.0, 2.0 + i, 1.0]))
    rows.append(_activation(model, layer, 7, ['▁Blue', '▁skies', f'▁{i}'], [0.0] * 3))
  rows.append(_activation(model, layer, 9, ['▁Ġbad', '▁mix'], [1.0, 0.0]))
  acts = _gz_lines(tmp_path / model / layer / 'activations' / 'batch-0.jsonl.gz', rows)
  expl = _gz_lines(tmp_path / model / layer / 'explanations' / 'batch-0.jsonl.gz', [
      {'id': 'x', 'modelId': model, 'layer': layer, 'index': '7', 'description': 'the color red',
       'authorId': 'a', 'typeName': 'oai_token-act-pair', 'explanationModelName': 'gpt-4o-mini'},
      {'id': 'y', 'modelId': model, 'layer': layer, 'index': '7', 'description': 'a later one'}])
  conversion = convert.neuronpedia([acts, expl])  # explanations listed last, read first
  out = tmp_path / 'records.jsonl'
  convert.write_records(conversion, str(out))
  report = conversion.report
  assert (report.records, report.features) == (24, 2)
  (skip,) = report.skipped
  assert skip.record == f'{acts} line 25' and 'mix SentencePiece' in skip.reason
  assert [w.feature_id for w in report.warnings] == [f'{model}/{layer}/9']

  grouped = read_grouped_records(str(out), tokenizer, threshold=2.5, heldout_fraction=0.25)
  red = grouped.features[grouped.feature_ids.index(f'{model}/{layer}/7')]
  assert red.meta == {'source': {'format': 'neuronpedia', 'modelId': model, 'layer': layer,
                                 'index': '7'}, 'explanation': 'the color red'}
  assert {e.word for e in red.train + red.heldout if e.target} == {'red'}


def test_a_list_of_features_and_bad_lines(tmp_path):
  path = tmp_path / 'features.json'
  path.write_text(json.dumps([_feature_api('1'), _feature_api('2'), {'modelId': 'x'}]),
                  encoding='utf-8')
  lines = tmp_path / 'acts.jsonl'
  lines.write_bytes(b'{"tokens": ["a"], "values": [1.0]}\n\xff\xfe\n'
                    + json.dumps(_activation('m', 'l', 3, ['Hi', ' there'], [0.0, 1.0])).encode()
                    + b'\n')
  conversion = convert.neuronpedia([str(path), str(lines)])
  records = list(conversion)
  assert [r['feature_id'] for r in records] == ['gpt2-small/8-res-jb/1'] * 2 + [
      'gpt2-small/8-res-jb/2'] * 2 + ['m/l/3']
  reasons = {s.record: s.reason for s in conversion.report.skipped}
  assert set(reasons) == {f'{path} [2]', f'{lines} line 1', f'{lines} line 2'}
  assert 'neither a feature' in reasons[f'{path} [2]']
  assert 'modelId' in reasons[f'{lines} line 1']
  assert 'not UTF-8' in reasons[f'{lines} line 2']
