"""delphi's latent cache and scored examples to records.

delphi (eai-delphi) needs vllm, faiss and sentence-transformers to import, so its files are
written here by :func:`save_delphi_cache`, a copy of the steps of delphi 0.1.3's
``LatentCache.save_splits`` and ``save_config`` (``delphi/latents/cache.py``): nonzero
locations ``[N, 3]`` (row, position, latent - start) as uint16 (uint32 past 2**16), float16
activations, the token ids in every split, files ``{start}_{end}.safetensors`` with ``end``
inclusive, ``config.json`` with ``model_name`` beside them. Score files follow
``delphi/__main__.py`` (``scores/{scorer}/{latent}.txt``, ``/`` written as ``--``) holding
``ClassifierOutput`` objects (``delphi/scorers/classifier/sample.py``). When delphi is
installed, the last test writes the cache with delphi itself.
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from tokenspace_jax.features import FeatureError, convert, load_records
from tokenspace_jax.features.convert.__main__ import main
from tokenspace_jax.features.grouped_records import read_grouped_records

CTX, WIDTH, HOOK = 64, 40, 'layers.3.mlp'


@pytest.fixture(scope='module')
def tokenizer():
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer
  return load_tokenizer(default_gguf_path())


def save_delphi_cache(latents_dir, hookpoint, tokens, dense, n_splits, model_name,
                      wide_locations=False):
  """delphi's save_splits + save_config, step by step, on a dense [rows, ctx, width] array."""
  locations = np.stack(np.nonzero(np.abs(dense) > 1e-5), axis=1)
  activations = dense[np.abs(dense) > 1e-5]
  width = dense.shape[2]
  boundaries = np.linspace(0, width, n_splits + 1).astype(np.int64)
  folder = os.path.join(latents_dir, hookpoint)
  os.makedirs(folder, exist_ok=True)
  for start, end in zip(boundaries[:-1], boundaries[1:] - 1, strict=True):
    mask = (locations[:, 2] >= start) & (locations[:, 2] <= end)
    loc = locations[mask].copy()
    loc[:, 2] -= start
    small = loc[:, 2].max(initial=0) < 2**16 and loc[:, 0].max(initial=0) < 2**16
    loc = loc.astype(np.uint16 if small and not wide_locations else np.uint32)
    save_file({'locations': loc, 'activations': activations[mask].astype(np.float16),
               'tokens': tokens}, os.path.join(folder, f'{start}_{end}.safetensors'))
  config = {'dataset_repo': 'EleutherAI/SmolLM2-135M-10B', 'dataset_split': 'train[:1%]',
            'dataset_name': '', 'dataset_column': 'text', 'batch_size': 8,
            'cache_ctx_len': tokens.shape[1], 'n_tokens': tokens.size, 'n_splits': n_splits,
            'model_name': model_name}
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=4)
  return folder


TEXTS = ['The cat sat on the mat while the dog slept by the door of the old house.',
         'We ordered 红烧肉 and rice; the dog ate a bone and the cat drank milk.',
         'Stock prices fell sharply on Monday as investors worried about rates.',
         'A quiet evening: tea, a book, rain on the window and nothing to do.']


def _cache(tokenizer, tmp_path, wide_locations=False):
  """Rows of token ids with BOS; latent 5 fires 3.0 on ' cat', latent 25 on ' dog' (2.0),
  latent 30 only on BOS, latent 12 nowhere."""
  rows = []
  for i in range(12):
    ids = []
    while len(ids) < CTX - 1:
      ids += tokenizer(' ' + TEXTS[(i + len(ids)) % len(TEXTS)],
                       add_special_tokens=False)['input_ids']
    rows.append([tokenizer.bos_token_id] + ids[:CTX - 1])
  tokens = np.array(rows, dtype=np.int64)
  dense = np.zeros((len(rows), CTX, WIDTH), np.float32)
  cat = tokenizer(' cat', add_special_tokens=False)['input_ids']
  dog = tokenizer(' dog', add_special_tokens=False)['input_ids']
  assert len(cat) == len(dog) == 1
  dense[:, :, 5][tokens == cat[0]] = 3.0
  dense[:, :, 25][tokens == dog[0]] = 2.0
  dense[:, 0, 30] = 8.0
  latents = tmp_path / 'latents'
  save_delphi_cache(str(latents), HOOK, tokens, dense, 2, 'HuggingFaceTB/SmolLM2-135M',
                    wide_locations)
  return str(latents), tokens


@pytest.mark.parametrize('same_tokenizer', [False, True])
def test_cache_round_trip(tmp_path, tokenizer, same_tokenizer):
  latents, tokens = _cache(tokenizer, tmp_path)
  conversion = convert.delphi(latents, tokenizer=tokenizer, negatives=5,
                              labeling_tokenizer=tokenizer if same_tokenizer else None)
  out = tmp_path / 'records.jsonl'
  report = convert.write_records(conversion, str(out))
  assert report.features == 2
  assert [s.feature_id for s in report.skipped] == [f'{HOOK}_latent30']
  assert 'special tokens' in report.skipped[0].reason
  records = [json.loads(line) for line in out.read_text(encoding='utf-8').splitlines()]
  key = 'token_ids' if same_tokenizer else 'tokens'
  assert all(key in r for r in records)
  assert all('\ufffd' not in (r.get('text') or ''.join(r['tokens'])) for r in records)
  assert all('<|endoftext|>' not in (r.get('text') or ''.join(r['tokens'])) for r in records)
  cats = [r for r in records if r['feature_id'] == f'{HOOK}_latent5']
  assert cats[0]['source'] == {'format': 'delphi', 'hookpoint': HOOK, 'latent': 5,
                               'model': 'HuggingFaceTB/SmolLM2-135M'}
  firing = [r for r in cats if any(a > 0 for a in r['activations'])]
  cat_id = tokenizer(' cat', add_special_tokens=False)['input_ids'][0]
  windows_with_cat = {(row, p // 32) for row, p in zip(*np.nonzero(tokens == cat_id),
                                                       strict=True)}
  assert len(firing) == len(windows_with_cat) and len(cats) - len(firing) == 5

  grouped = read_grouped_records(str(out), tokenizer, heldout_fraction=0.25)
  assert grouped.feature_ids == [f'{HOOK}_latent5', f'{HOOK}_latent25']
  for feature, word, value in zip(grouped.features, ('cat', 'dog'), (3.0, 2.0), strict=True):
    positives = [e for e in feature.train + feature.heldout if e.target]
    assert {e.word for e in positives} == {word} and {e.activation for e in positives} == {value}
    assert sum(1 for e in feature.train + feature.heldout if e.word == word) == len(positives)
    assert feature.meta['source']['model'] == 'HuggingFaceTB/SmolLM2-135M'


def test_cache_options_and_uint32_locations(tmp_path, tokenizer):
  latents, _ = _cache(tokenizer, tmp_path, wide_locations=True)
  conversion = convert.delphi(os.path.join(latents, HOOK, '20_39.safetensors'),
                              tokenizer=tokenizer, latents=[25, 21], max_positives=3,
                              negatives=2, window=16)
  records = list(conversion)
  assert {r['feature_id'] for r in records} == {f'{HOOK}_latent25'}
  assert len(records) == 5
  assert max(len(r['tokens']) for r in records) <= 16
  assert [(s.feature_id, s.reason) for s in conversion.report.skipped] == [
      (f'{HOOK}_latent21', 'the latent never fires in this cache.')]
  peaks = sorted(max(r['activations']) for r in records)
  assert peaks == [0.0, 0.0, 2.0, 2.0, 2.0]


def test_cache_tokenizer_that_cannot_load_offline_is_one_error(tmp_path, tokenizer):
  latents, _ = _cache(tokenizer, tmp_path)
  with open(os.path.join(latents, HOOK, 'config.json')) as f:
    config = json.load(f)
  config['model_name'] = 'no-such-org/no-such-model-here'
  with open(os.path.join(latents, HOOK, 'config.json'), 'w') as f:
    json.dump(config, f)
  with pytest.raises(FeatureError, match='--tokenizer=PATH') as info:
    list(convert.delphi(latents))
  assert 'no-such-org/no-such-model-here' in str(info.value) and 'offline' in str(info.value)


def test_cache_bad_files_are_clear(tmp_path, tokenizer):
  folder = tmp_path / 'latents' / HOOK
  folder.mkdir(parents=True)
  (folder / '0_9.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
  conversion = convert.delphi(str(tmp_path / 'latents'), tokenizer=tokenizer)
  assert list(conversion) == []
  (skip,) = conversion.report.skipped
  assert 'safetensors' in skip.reason and skip.record.endswith('0_9.safetensors')
  save_file({'locations': np.zeros((1, 3), np.uint16), 'activations': np.ones(1, np.float16)},
            str(folder / '0_9.safetensors'))
  conversion = convert.delphi(str(folder), tokenizer=tokenizer)
  assert list(conversion) == [] and 'save_tokens' in conversion.report.skipped[0].reason
  with pytest.raises(FeatureError, match='no delphi cache'):
    convert.delphi(str(tmp_path))
  with pytest.raises(FeatureError, match='window'):
    convert.delphi(str(folder), window=0)


def test_command_line(tmp_path, tokenizer, capsys):
  latents, _ = _cache(tokenizer, tmp_path)
  out = tmp_path / 'records.jsonl'
  assert main(['--from=delphi', latents, '--tokenizer=default', f'--out={out}',
               '--latents=5,25,30', f'--report={tmp_path / "report.json"}']) == 0
  printed = capsys.readouterr().out
  assert 'records of 2 features' in printed and 'latent30' in printed
  assert json.loads((tmp_path / 'report.json').read_text())['skipped'][0]['feature_id'] == (
      f'{HOOK}_latent30')
  assert main(['--from=openai', latents, f'--out={out}', '--tokenizer=x']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and '--tokenizer only apply to --from=delphi' in err
  assert main(['--from=nope', latents, f'--out={out}']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'invalid choice' in err


# --- scored examples -------------------------------------------------------------------------


def _classifier_output(tokens, acts, activating, distance=0):
  return {'str_tokens': tokens, 'activations': acts, 'distance': distance,
          'activating': activating, 'prediction': activating, 'probability': 0.0,
          'correct': True}


def test_scored_examples(tmp_path, tokenizer):
  scores = tmp_path / 'scores' / 'detection'
  scores.mkdir(parents=True)
  examples = [
      _classifier_output(['The', ' cat', ' sat'], [0.0, 4.0, 0.0], True, 1),
      _classifier_output(['A', ' cat', ' ran', '.'], [0.0, 2.0, 0.0, 0.0], True, 3),
      _classifier_output(['The', ' cat', ' sat'], [0.0, 4.0, 0.0], True, 1),
      _classifier_output(['Tea', ' and', ' cake'], [0.0, 0.0, 0.0], False),
      _classifier_output(['We', ' ate', ' \ufffd', '\ufffd'], [0.0, 0.0, 0.0, 0.0], False),
      _classifier_output(['Rain', ' again'], [0.0, 0.0], False),
  ]
  name = 'model--layers.3--mlp_latent17.txt'  # delphi writes "/" in the hookpoint as "--"
  (scores / name).write_text(json.dumps(examples), encoding='utf-8')
  (scores / 'notes.txt').write_text('not a score file', encoding='utf-8')
  conversion = convert.delphi_scores(str(tmp_path / 'scores'))
  out = tmp_path / 'records.jsonl'
  convert.write_records(conversion, str(out))
  fid = 'model/layers.3/mlp_latent17'
  assert (conversion.report.records, conversion.report.features) == (4, 1)
  reasons = {s.record: s.reason for s in conversion.report.skipped}
  assert set(reasons) == {str(scores / 'notes.txt'), f'{scores / name} [2]',
                          f'{scores / name} [4]'}
  assert 'U+FFFD' in reasons[f'{scores / name} [4]']
  feature = load_records(str(out), tokenizer, heldout_fraction=0.0, max_negatives_per_text=None)
  assert sorted((e.word, e.activation) for e in feature.train if e.target) == [
      ('cat', 2.0), ('cat', 4.0)]
  assert feature.meta['source'] == {'format': 'delphi', 'hookpoint': 'model/layers.3/mlp',
                                    'latent': 17, 'scorer': 'detection'}
  assert json.loads(out.read_text().splitlines()[0])['feature_id'] == fid


def test_cache_written_by_delphi(tmp_path, tokenizer):
  torch = pytest.importorskip('torch')
  cache_lib = pytest.importorskip('delphi.latents.cache')
  config_lib = pytest.importorskip('delphi.config')
  rows = np.array([tokenizer(' the cat and the dog ' * 16, add_special_tokens=False)[
      'input_ids'][:CTX]] * 4, dtype=np.int64)
  cat = tokenizer(' cat', add_special_tokens=False)['input_ids'][0]
  dense = torch.zeros(4, CTX, WIDTH)
  dog = tokenizer(' dog', add_special_tokens=False)['input_ids'][0]
  dense[:, :, 5][torch.tensor(rows == cat)] = 3.0
  dense[:, :, 25][torch.tensor(rows == dog)] = 1.5  # delphi cannot save an empty split
  cache = cache_lib.LatentCache.__new__(cache_lib.LatentCache)
  cache.width = WIDTH
  cache.cache = cache_lib.InMemoryCache(batch_size=4)
  cache.cache.add(dense, torch.tensor(rows), 0, HOOK)
  cache.cache.save()
  cache.save_splits(n_splits=2, save_dir=tmp_path / 'latents')
  cache.save_config(tmp_path / 'latents', config_lib.CacheConfig(), 'HuggingFaceTB/SmolLM2-135M')
  records = list(convert.delphi(str(tmp_path / 'latents'), tokenizer=tokenizer))
  assert [r['feature_id'] for r in records].count(f'{HOOK}_latent25') > 0
  records = [r for r in records if r['feature_id'] == f'{HOOK}_latent5']
  assert records[0]['source']['model'] == 'HuggingFaceTB/SmolLM2-135M'
  assert sum(a == 3.0 for r in records for a in r['activations']) == int((rows == cat).sum())
