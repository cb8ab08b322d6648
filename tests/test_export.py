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


# --- lines written by a real batch job -------------------------------------------------------

# Each feature's records carry the source its importer writes (features/convert/from_*.py).
REAL_FEATURES = {
    'animal': ('layers.6.mlp_latent12', {'format': 'delphi', 'hookpoint': 'layers.6.mlp',
                                         'latent': 12, 'model': 'HuggingFaceTB/SmolLM2-135M'}),
    'number': ('gpt2-small/8-res-jb/4096', {'format': 'neuronpedia', 'modelId': 'gpt2-small',
                                            'layer': '8-res-jb', 'index': '4096'}),
    'mammal': ('5/131', {'format': 'openai', 'layer_index': 5, 'neuron_index': 131}),
}
REAL_OVERRIDES = {'steps': 3, 'checkpoint_every': 3, 'early_stop.prob': 0.0,
                  'feature.max_train': 16, 'feature.max_heldout': 16,
                  'eval.calibration_examples': 8, 'eval.bootstrap': 20, 'choice.examples': 8,
                  'choice.top_k': 2, 'batch.features_per_step': 3}


def _batch_labels(tiny_folder, tmp_path):
  """labels.jsonl of ``tokenspace_jax.batch`` run on the built-in features' sentences with the
  tiny random model: every field as views.labels_line writes it, whatever the labels say. The
  Neuronpedia feature has only texts where it fires, as that importer gives, so every held-out
  window holds a positive and its window-level AUROC and balanced accuracy are NaN."""
  import importlib.util

  from tokenspace_jax import batch, config_defaults
  from tokenspace_jax.features.synthetic_records import synthetic_records
  from tokenspace_jax.models import load_model

  records = tmp_path / 'records.jsonl'
  with open(records, 'w', encoding='utf-8') as f:
    for name, (fid, source) in REAL_FEATURES.items():
      rows = synthetic_records(name, fid)
      if source['format'] == 'neuronpedia':  # it lists only texts where the feature fires
        rows = [r for r in rows if max(r['activations']) > 0]
      for r in rows[:30]:
        f.write(json.dumps({**r, 'source': source}, ensure_ascii=False) + '\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location('batch_config',
                                                os.path.join(root, 'configs', 'batch.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = config_defaults.override(module.get_config(), {
      **REAL_OVERRIDES, 'model.source': tiny_folder, 'features': str(records)})
  workdir = tmp_path / 'batch'
  batch.run(config, str(workdir), lm=load_model(tiny_folder))
  return str(workdir / 'labels.jsonl')


@pytest.fixture(scope='module')
def real_labels(tiny_folder, tmp_path_factory):
  return _batch_labels(tiny_folder, tmp_path_factory.mktemp('real'))


def _strict_loads(text):
  """JSON as JavaScript and orjson read it: NaN and Infinity are refused."""
  def refuse(constant):
    raise ValueError(f'{constant} is not JSON')
  return json.loads(text, parse_constant=refuse)


def _read_lines(path):
  with open(path, encoding='utf-8') as f:
    return {line['feature_id']: line for line in map(json.loads, f)}


def test_exports_of_a_real_labels_file(tmp_path, real_labels):
  lines = _read_lines(real_labels)
  assert set(lines) == {fid for fid, _ in REAL_FEATURES.values()}
  for line in lines.values():  # the fields the exports read, as the job writes them
    assert isinstance(line['label'], str) and line['label'].strip()
    assert set(line['auroc']) == {'found', 'found_interval', 'reference', 'random_mean'}
    assert set(line['scores']) == {'detection', 'correlation', 'balanced_accuracy'}
    assert set(line['scores']['detection']) == {'auroc', 'balanced_accuracy', 'f1', 'windows',
                                                'positive_windows'}

  delphi_line = lines['layers.6.mlp_latent12']
  report = export_lib.export('delphi', real_labels, str(tmp_path / 'results' / 'run'))
  assert len(report.written) == 1 and len(report.skipped) == 2
  assert _delphi_reads(str(tmp_path / 'results' / 'run' / 'explanations'), 'layers.6.mlp',
                       12) == delphi_line['label'].strip()

  line = lines['gpt2-small/8-res-jb/4096']
  det = line['scores']['detection']
  # Every held-out window fires: no window-level AUROC, written NaN by Python's json (which
  # JavaScript and orjson refuse).
  assert det['windows'] == det['positive_windows']
  assert det['auroc'] is None or det['auroc'] != det['auroc']
  export_lib.export('neuronpedia', real_labels, str(tmp_path / 'np'))
  text = (tmp_path / 'np' / 'gpt2-small' / '8-res-jb' / '4096.json').read_text(encoding='utf-8')
  explanation = _strict_loads(text)
  assert explanation['description'] == line['label'].strip()
  assert explanation['token_id'] == line['token_id']
  assert explanation['identifiable'] is line['identifiable']
  assert (explanation['verdict'], explanation['verdict_status']) == (line['verdict'],
                                                                      line['verdict_status'])
  values = {s['explanationScoreTypeName'].removeprefix('tokenspace-jax '): s['value']
            for s in explanation['scores']}
  expected = {'auroc_found': line['auroc']['found'],
              'auroc_reference': line['auroc']['reference'],
              'auroc_random_mean': line['auroc']['random_mean'],
              'detection_auroc': det['auroc'], 'detection_balanced_accuracy':
              det['balanced_accuracy'], 'detection_f1': det['f1'],
              'correlation': line['scores']['correlation'],
              'balanced_accuracy': line['scores']['balanced_accuracy']}
  assert line['auroc']['reference'] is not None  # the records' reference_word
  assert values == {k: v for k, v in expected.items() if v is not None and v == v}  # NaN: out
  assert 'detection_auroc' not in values and 'auroc_found' in values
  assert explanation['heldout'] == {
      'examples': line['heldout']['examples'], 'positives': line['heldout']['positives'],
      'windows': det['windows'], 'positive_windows': det['positive_windows']}

  line = lines['5/131']
  export_lib.export('openai', real_labels, str(tmp_path / 'oa'))
  results = _strict_loads((tmp_path / 'oa' / '5' / '131.jsonl').read_text(encoding='utf-8'))
  (scored,) = results['scored_explanations']
  assert scored['explanation'] == line['label'].strip()
  correlation = line['scores']['correlation']
  assert scored['scored_simulation']['ev_correlation_score'] == (
      correlation if correlation == correlation else None)

