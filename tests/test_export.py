"""Exports of labels.jsonl for delphi, Neuronpedia and OpenAI's neuron_explainer.

delphi cannot be installed here (it needs vllm and faiss), so its reading of an explanation is
reimplemented from ``delphi/__main__.py`` (0.1.3, ``process_cache``'s ``none_postprocessor``):
``explanations_path / f"{result.record.latent}.txt"`` with ``str(Latent)`` being
``f"{module_name}_latent{latent_index}"`` (``delphi/latents/latents.py``), read with
``orjson.loads`` (orjson when installed, else json, which parses the same JSON). The OpenAI file
is checked against ``neuron_explainer.explanations.explanations``' field names, and read with
the package itself when it is installed.
"""

import json
import os

import pytest

from tokenspace_jax.outputs import export as export_lib


def _line(fid, label, source=None, **extra):
  line = {'feature_id': fid, 'label': label, 'token_id': 1234, 'probability': 0.97,
          'identifiable': True, 'verdict': 'IDENTIFIABLE: ...',
          'auroc': {'found': 0.81, 'found_interval': [0.7, 0.9], 'reference': None,
                    'random_mean': 0.52},
          'heldout': {'examples': 80, 'positives': 20, 'scores': []},
          'scores': {'detection': {'auroc': 0.77, 'balanced_accuracy': 0.7, 'f1': 0.66,
                                   'windows': 40, 'positive_windows': 10},
                     'correlation': 0.41, 'balanced_accuracy': 0.72}}
  if source is not None:
    line['source'] = source
  line.update(extra)
  return line


LINES = [
    _line('layers.6.mlp_latent12', ' color',
          {'format': 'delphi', 'hookpoint': 'layers.6.mlp', 'latent': 12, 'model': 'm'}),
    _line('gpt2-small/8-res-jb/4096', ' Paris',
          {'format': 'neuronpedia', 'modelId': 'gpt2-small', 'layer': '8-res-jb',
           'index': '4096'}, identifiable=False, verdict='NOT IDENTIFIABLE: ...'),
    _line('5/131', ' cats', {'format': 'openai', 'layer_index': 5, 'neuron_index': 131}),
    _line('blocks.8.hook_resid_pre_latent7', ' Ünïcode "quoted"',
          {'format': 'saelens', 'hookpoint': 'blocks.8.hook_resid_pre', 'latent': 7,
           'modelId': 'gpt2-small', 'layer': '8-res-jb'}),
    _line('layers.2.attn_latent3', ' plain'),  # no source: the feature id names it
    {'feature_id': 'layers.6.mlp_latent99', 'error': 'FeatureError: no positive example'},
    _line('colors', ' hue'),
]


@pytest.fixture
def labels(tmp_path):
  path = tmp_path / 'run' / 'labels.jsonl'
  path.parent.mkdir()
  path.write_text(''.join(json.dumps(line, ensure_ascii=False) + '\n' for line in LINES)
                  + '{"feature_id": "cut', encoding='utf-8')
  return str(path)


def _delphi_reads(explanations_path, module_name, latent_index):
  """delphi's none_postprocessor: the explanation of Latent(module_name, latent_index)."""
  try:
    import orjson
    loads = orjson.loads
  except ImportError:
    loads = json.loads
  latent = f'{module_name}_latent{latent_index}'  # str(Latent)
  explanation_path = os.path.join(explanations_path, f'{latent}.txt')
  if not os.path.exists(explanation_path):
    raise FileNotFoundError(explanation_path)
  with open(explanation_path, 'rb') as f:
    return loads(f.read())


def test_delphi_explanations_read_back_by_delphi(tmp_path, labels):
  out = tmp_path / 'results' / 'run'
  report = export_lib.export('delphi', labels, str(out))
  explanations = str(out / 'explanations')
  assert _delphi_reads(explanations, 'layers.6.mlp', 12) == 'color'
  assert _delphi_reads(explanations, 'blocks.8.hook_resid_pre', 7) == 'Ünïcode "quoted"'
  assert _delphi_reads(explanations, 'layers.2.attn', 3) == 'plain'
  assert sorted(os.listdir(explanations)) == [
      'blocks.8.hook_resid_pre_latent7.txt', 'layers.2.attn_latent3.txt',
      'layers.6.mlp_latent12.txt']
  skipped = dict(report.skipped)
  assert set(skipped) == {'line 8', 'layers.6.mlp_latent99', 'gpt2-small/8-res-jb/4096',
                          '5/131', 'colors'}
  assert 'no positive example' in skipped['layers.6.mlp_latent99']


def test_neuronpedia_explanations(tmp_path, labels):
  report = export_lib.export('neuronpedia', labels, str(tmp_path / 'np'),
                             explanation_model_name='SmolLM2-135M-Instruct')
  assert len(report.written) == 2 and report.not_identifiable == 1
  with open(tmp_path / 'np' / 'gpt2-small' / '8-res-jb' / '4096.json', encoding='utf-8') as f:
    paris = json.load(f)
  assert {k: paris[k] for k in ('modelId', 'layer', 'index', 'description',
                                'explanationModelName')} == {
      'modelId': 'gpt2-small', 'layer': '8-res-jb', 'index': '4096', 'description': 'Paris',
      'explanationModelName': 'SmolLM2-135M-Instruct'}
  assert paris['identifiable'] is False and paris['verdict'].startswith('NOT')
  values = {s['explanationScoreTypeName']: s['value'] for s in paris['scores']}
  assert values['tokenspace-jax auroc_found'] == 0.81
  assert values['tokenspace-jax detection_auroc'] == 0.77
  assert values['tokenspace-jax detection_f1'] == 0.66
  assert values['tokenspace-jax correlation'] == 0.41
  assert 'tokenspace-jax auroc_reference' not in values  # no reference word: no score
  with open(tmp_path / 'np' / 'gpt2-small' / '8-res-jb' / '7.json', encoding='utf-8') as f:
    assert json.load(f)['index'] == '7'  # a SAELens source with Neuronpedia ids
  only = export_lib.export('neuronpedia', labels, str(tmp_path / 'np2'), identifiable_only=True)
  assert len(only.written) == 1


def test_openai_explanations(tmp_path, labels):
  report = export_lib.export('openai', labels, str(tmp_path / 'oa'))
  assert report.written == [str(tmp_path / 'oa' / '5' / '131.jsonl')]
  text = (tmp_path / 'oa' / '5' / '131.jsonl').read_text(encoding='utf-8')
  assert text.count('\n') == 1
  results = json.loads(text)
  assert results['neuron_id'] == {'dataclass_name': 'NeuronId', 'layer_index': 5,
                                  'neuron_index': 131}
  (scored,) = results['scored_explanations']
  assert scored['explanation'] == 'cats'
  assert scored['scored_simulation']['ev_correlation_score'] == 0.41
  assert set(scored['scored_simulation']) == {
      'dataclass_name', 'scored_sequence_simulations', 'ev_correlation_score',
      'rsquared_score', 'absolute_dev_explained_score'}


def test_openai_file_reads_with_neuron_explainer(tmp_path, labels):
  explanations = pytest.importorskip('neuron_explainer.explanations.explanations')
  export_lib.export('openai', labels, str(tmp_path / 'oa'))
  results = explanations.load_neuron_explanations(str(tmp_path / 'oa'), 5, 131)
  assert isinstance(results, explanations.NeuronSimulationResults)
  assert results.scored_explanations[0].explanation == 'cats'
  assert results.scored_explanations[0].get_preferred_score() == 0.41


def test_command_line(tmp_path, labels, capsys):
  assert export_lib.main(['--format=delphi', f'--labels={labels}', f'--out={tmp_path}']) == 0
  out = capsys.readouterr().out
  assert '3 labels written' in out and 'the feature failed' in out
  assert export_lib.main(['--format=delphi', f'--labels={tmp_path}/nope.jsonl',
                          f'--out={tmp_path}']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'cannot be read' in err
  assert export_lib.main(['--format=xml', f'--labels={labels}', f'--out={tmp_path}']) == 2
  assert 'invalid choice' in capsys.readouterr().err
