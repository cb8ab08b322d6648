"""docs/own_feature.md's SAELens snippet: ``records_from_arrays`` on what ``sae.encode`` returns.

SAELens and TransformerLens need a model download to produce activations, so the arrays are
made here with the shapes the snippet passes: token ids ``[batch, pos]`` (``model.to_tokens``,
BOS first) or token strings (``model.to_str_tokens``), and activations ``[batch, pos, d_sae]``.
"""

import numpy as np
import pytest

from tokenspace_jax.features import FeatureError, convert
from tokenspace_jax.features.grouped_records import read_grouped_records

TEXTS = ['The cat sat on the mat near the door of the house.',
         'A dog ran after the cat across the wet green field.',
         'Prices rose again on Tuesday, surprising most traders.',
         'My cat sleeps all day and plays with string at night.',
         'The meeting was moved to Friday because of the storm.',
         'Two cats and one dog live with my grandmother.']


@pytest.fixture(scope='module')
def tokenizer():
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer
  return load_tokenizer(default_gguf_path())


def _batch(tokenizer):
  ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)['input_ids']
         for t in TEXTS]
  pos = max(map(len, ids))
  eos = tokenizer.eos_token_id
  tokens = np.array([row + [eos] * (pos - len(row)) for row in ids], dtype=np.int64)
  d_sae = 16
  acts = np.zeros((len(ids), pos, d_sae), np.float32)
  pieces = [[tokenizer.decode([i]) for i in row] for row in tokens]
  for b, row in enumerate(pieces):
    for p, piece in enumerate(row):
      if piece.strip() in ('cat', 'cats'):
        acts[b, p, 3] = 2.5
      if piece.strip() == 'dog':
        acts[b, p, 9] = 1.25
    acts[b, 0, 11] = 50.0  # fires on BOS only, like many real latents
  return tokens, acts


def test_records_from_token_ids(tmp_path, tokenizer):
  tokens, acts = _batch(tokenizer)
  conversion = convert.records_from_arrays(
      tokens, acts, latents=[3, 9, 11, 5], tokenizer=tokenizer,
      source={'release': 'gpt2-small-res-jb', 'sae_id': 'blocks.8.hook_resid_pre',
              'hookpoint': 'blocks.8.hook_resid_pre'})
  out = tmp_path / 'records.jsonl'
  report = convert.write_records(conversion, str(out))
  assert (report.records, report.features) == (12, 2)
  assert sorted(s.feature_id for s in report.skipped) == [
      'blocks.8.hook_resid_pre_latent11', 'blocks.8.hook_resid_pre_latent5']
  grouped = read_grouped_records(str(out), tokenizer, heldout_fraction=0.3)
  assert grouped.feature_ids == ['blocks.8.hook_resid_pre_latent3',
                                 'blocks.8.hook_resid_pre_latent9']
  cats, dogs = grouped.features
  assert {e.word for e in cats.train + cats.heldout if e.target} == {'cat', 'cats'}
  assert {e.activation for e in cats.train + cats.heldout if e.target} == {2.5}
  assert {e.word for e in dogs.train + dogs.heldout if e.target} == {'dog'}
  assert cats.meta['source'] == {'format': 'saelens', 'release': 'gpt2-small-res-jb',
                                 'sae_id': 'blocks.8.hook_resid_pre',
                                 'hookpoint': 'blocks.8.hook_resid_pre', 'latent': 3}
  assert not any('<|endoftext|>' in e.text for e in cats.train + cats.heldout)


def test_records_from_token_strings_and_torch(tokenizer):
  torch = pytest.importorskip('torch')
  tokens, acts = _batch(tokenizer)
  str_tokens = [[tokenizer.decode([i]) for i in row] for row in tokens]
  assert str_tokens[0][0] == tokenizer.bos_token and str_tokens[0][0].startswith('<|')
  records = list(convert.records_from_arrays(str_tokens, torch.from_numpy(acts)))
  assert sorted({r['feature_id'] for r in records}) == [3, 9]  # 11 fires only on BOS
  assert all(not r['tokens'][0].startswith('<|') for r in records)


def test_same_tokenizer_keeps_ids(tokenizer):
  tokens, acts = _batch(tokenizer)
  records = list(convert.records_from_arrays(tokens, acts, latents=[3], tokenizer=tokenizer,
                                             labeling_tokenizer=tokenizer))
  assert all('token_ids' in r and tokenizer.bos_token_id not in r['token_ids'] for r in records)


@pytest.mark.parametrize('change, message', [
    (lambda t, a: (t[:, :-1], a), 'disagree'),
    (lambda t, a: (t, a[0]), 'batch, pos, d_sae'),
    (lambda t, a: (t, np.where(a > 2, np.nan, a)), 'NaN'),
    (lambda t, a: (t.astype(np.float32), a), 'token ids'),
])
def test_bad_arrays_are_one_error(tokenizer, change, message):
  tokens, acts = change(*_batch(tokenizer))
  with pytest.raises(FeatureError, match=message):
    convert.records_from_arrays(tokens, acts, tokenizer=tokenizer)


def test_bad_latent_and_missing_tokenizer(tokenizer):
  tokens, acts = _batch(tokenizer)
  with pytest.raises(FeatureError, match='outside'):
    convert.records_from_arrays(tokens, acts, latents=[16], tokenizer=tokenizer)
  with pytest.raises(FeatureError, match='tokenizer'):
    convert.records_from_arrays(tokens, acts)
