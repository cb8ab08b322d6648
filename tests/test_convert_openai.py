"""OpenAI automated-interpretability NeuronRecords to records.

The fixtures are written from the field names of ``neuron_explainer.activations.activations``
(``NeuronRecord``, ``NeuronId``, ``ActivationRecord``, read from neuron_explainer 0.0.1's code),
including the ``dataclass_name`` keys its ``fast_dataclasses.dumps`` adds: the package itself
needs blobfile, boostedblob and tiktoken at import, more than a test should install. When it is
installed, the last test writes the fixture with it.
"""

import json

import pytest

from tokenspace_jax.features import FeatureError, convert, load_records
from tokenspace_jax.features.grouped_records import read_grouped_records


@pytest.fixture(scope='module')
def tokenizer():
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer
  return load_tokenizer(default_gguf_path())


def _activation_record(tokens, acts):
  return {'dataclass_name': 'ActivationRecord', 'tokens': tokens, 'activations': acts}


def _neuron(layer, index, top, random=(), quantiles=None):
  return {'dataclass_name': 'NeuronRecord',
          'neuron_id': {'dataclass_name': 'NeuronId', 'layer_index': layer,
                        'neuron_index': index},
          'random_sample': list(random), 'random_sample_by_quantile': quantiles,
          'quantile_boundaries': None, 'mean': 0.1, 'variance': 1.0, 'skewness': 0.0,
          'kurtosis': 3.0, 'most_positive_activation_records': list(top)}


TOP = [_activation_record(['The', ' dog', ' barked', ' at', ' the', ' cat', '.'],
                          [0.0, 0.1, 0.0, 0.0, 0.0, 6.5, 0.2]),
       _activation_record(['<|endoftext|>', 'A', ' cat', ' slept', '.'],
                          [9.0, 0.0, 5.25, 0.3, 0.0]),
       _activation_record(['Cats', ' and', ' kittens', ' purr', '.'], [4.0, 0.0, 3.5, 1.0, 0.0])]
RANDOM = [_activation_record(['The', ' stock', ' market', ' fell', '.'], [0.0] * 5),
          _activation_record(['A', ' dog', ' ran', ' home', '.'], [0.0, 0.4, 0.0, 0.0, 0.0])]


def _write(tmp_path, obj, name):
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj), encoding='utf-8')
  return str(path)


def test_round_trip_positives_and_negatives(tmp_path, tokenizer):
  quantiles = [[RANDOM[0]], [_activation_record(['My', ' cat', ' is', ' old', '.'],
                                                 [0.0, 2.0, 0.0, 0.0, 0.0])]]
  path = _write(tmp_path, _neuron(5, 131, TOP, RANDOM + [TOP[0]], quantiles),
                'neurons/5/131.json')
  conversion = convert.openai([str(tmp_path / 'neurons')])
  records = list(conversion)
  assert {r['feature_id'] for r in records} == {'5/131'}
  assert all(r['source'] == {'format': 'openai', 'layer_index': 5, 'neuron_index': 131}
             for r in records)
  assert len(records) == 6  # 3 top + 2 random + 1 quantile; TOP[0] again and RANDOM[0] again
  skipped = conversion.report.skipped
  assert len(skipped) == 2 and all('earlier record' in s.reason for s in skipped)
  assert {s.record for s in skipped} == {f'{path} random_sample[2]',
                                         f'{path} random_sample_by_quantile[0][0]'}
  assert not conversion.report.warnings
  # The special token is dropped with its activation; the rest is unchanged.
  assert records[1]['tokens'] == ['A', ' cat', ' slept', '.']
  assert records[1]['activations'] == [0.0, 5.25, 0.3, 0.0]

  out = tmp_path / 'records.jsonl'
  report = convert.write_records(convert.openai(path), str(out))
  assert (report.records, report.features) == (6, 1)
  feature = load_records(str(out), tokenizer, threshold=1.0, heldout_fraction=0.0,
                         max_negatives_per_text=None)
  positives = sorted((e.word, e.activation) for e in feature.train if e.target)
  assert positives == [('Cats', 4.0), ('cat', 2.0), ('cat', 5.25), ('cat', 6.5),
                       ('kittens', 3.5)]
  assert feature.meta['source']['neuron_index'] == 131
  assert sum(1 for e in feature.train if not e.target and e.word == 'market') == 1
  grouped = read_grouped_records(str(out), tokenizer, threshold=1.0, heldout_fraction=0.3)
  assert grouped.feature_ids == ['5/131'] and grouped.features[0].meta == feature.meta


def test_top_records_only_is_a_warning(tmp_path):
  conversion = convert.openai(_write(tmp_path, _neuron(0, 7, TOP), 'n.json'))
  assert len(list(conversion)) == 3
  (warning,) = conversion.report.warnings
  assert warning.feature_id == '0/7' and 'no random sample' in warning.reason
  assert 'warning' in conversion.report.summary()


def test_bad_records_and_files_are_skipped_with_reasons(tmp_path):
  garbled = _activation_record(['The', ' caf', '\ufffd', '\ufffd'], [0.0, 1.0, 2.0, 0.0])
  short = _activation_record(['a', ' b'], [1.0])
  good = _write(tmp_path, _neuron(1, 2, TOP + [garbled, short], RANDOM), 'good.json')
  no_id = _write(tmp_path, {'most_positive_activation_records': TOP}, 'no_id.json')
  broken = tmp_path / 'broken.json'
  broken.write_text('{"neuron_id": ', encoding='utf-8')
  conversion = convert.openai([good, no_id, str(broken)])
  assert len(list(conversion)) == 5
  reasons = {(s.record, s.reason.split(': ', 1)[-1][:40]) for s in conversion.report.skipped}
  assert len(reasons) == 4
  by_record = {s.record: s.reason for s in conversion.report.skipped}
  assert 'U+FFFD' in by_record[f'{good} most_positive_activation_records[3]']
  assert '2 tokens but 1 activations' in by_record[f'{good} most_positive_activation_records[4]']
  assert 'neuron_id' in by_record[no_id]
  assert 'invalid JSON' in by_record[str(broken)]


def test_missing_input_is_one_error(tmp_path):
  with pytest.raises(FeatureError, match='no such file'):
    convert.openai([str(tmp_path / 'nope.json')])


def test_fixture_written_by_neuron_explainer(tmp_path):
  fdc = pytest.importorskip('neuron_explainer.fast_dataclasses')
  acts = pytest.importorskip('neuron_explainer.activations.activations')
  record = acts.NeuronRecord(
      neuron_id=acts.NeuronId(layer_index=3, neuron_index=9),
      most_positive_activation_records=[acts.ActivationRecord(r['tokens'], r['activations'])
                                        for r in TOP],
      random_sample=[acts.ActivationRecord(r['tokens'], r['activations']) for r in RANDOM])
  path = tmp_path / '9.json'
  path.write_bytes(fdc.dumps(record))
  records = list(convert.openai(str(path)))
  assert len(records) == 5 and records[0]['feature_id'] == '3/9'
  assert records[0]['activations'] == TOP[0]['activations']
