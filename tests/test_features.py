"""Tests for the labeling data: built-in features and activation records."""

import importlib.resources
import json
import re

import pytest

from tokenspace_jax.features import (
  SYNTHETIC_FEATURES,
  FeatureError,
  FeatureFileNotFoundError,
  load_records,
  load_synthetic_feature,
  synthetic,
)

KANA = re.compile(r'[\u3040-\u30ff]')
HANGUL = re.compile(r'[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]')
HAN = re.compile(r'[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]')


def _rows(name):
  path = importlib.resources.files('tokenspace_jax.features').joinpath('data', f'{name}.jsonl')
  return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines() if line]


def _marked_words(name, kind):
  return [row['text'][s:e] for row in _rows(name) for s, e in row[kind]]


# --- synthetic features: the package data ------------------------------------------------------


@pytest.mark.parametrize('name', SYNTHETIC_FEATURES)
def test_data_file_is_well_formed(name):
  rows = _rows(name)
  assert len(rows) >= 200
  assert len({row['text'] for row in rows}) == len(rows), 'duplicate sentences'
  for row in rows:
    text = row['text']
    assert row['split'] in ('train', 'heldout')
    assert row['positive'] or row['hard_negative'], text
    for s, e in row['positive'] + row['hard_negative']:
      assert 0 <= s < e <= len(text), (text, s, e)
      assert text[s:e] == text[s:e].strip(), (text, s, e)
    for ps, pe in row['positive']:
      for hs, he in row['hard_negative']:
        assert pe <= hs or he <= ps, f'positive and hard negative overlap in {text!r}'
  assert sum(bool(row['hard_negative']) for row in rows) >= 0.4 * len(rows)
  heldout = [row for row in rows if row['split'] == 'heldout']
  assert 0.15 * len(rows) <= len(heldout) <= 0.35 * len(rows)


@pytest.mark.parametrize('name', SYNTHETIC_FEATURES)
def test_both_splits_have_positives_and_hard_negatives(name):
  feature = load_synthetic_feature(name)
  assert feature.name == name and feature.reference_word
  for split in (feature.train, feature.heldout):
    assert any(ex.target == 1.0 for ex in split)
    assert any(ex.hard_negative for ex in split)
    assert any(ex.target == 0.0 and not ex.hard_negative for ex in split)
  by_text = {}
  for ex in feature.train + feature.heldout:
    assert ex.word and ex.word == ex.word.strip()
    assert ex.activation == ex.target
    assert not (ex.hard_negative and ex.target)
    by_text.setdefault(ex.text, []).append((ex.start, ex.end))
  for text, spans in by_text.items():
    spans.sort()
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1)), text


@pytest.mark.parametrize('name', SYNTHETIC_FEATURES)
def test_deterministic(name):
  first = load_synthetic_feature(name)
  synthetic._build.cache_clear()
  assert load_synthetic_feature(name) == first
  assert load_synthetic_feature(name, negatives='natural') == load_synthetic_feature(
      name, negatives='natural')


@pytest.mark.parametrize('name', SYNTHETIC_FEATURES)
def test_negative_modes(name):
  hard = load_synthetic_feature(name, negatives='hard')
  easy = load_synthetic_feature(name, negatives='easy')
  natural = load_synthetic_feature(name, negatives='natural')

  def split_set(f):
    return {(ex.text, ex.start, ex.end, ex.target, ex.hard_negative)
            for ex in f.train + f.heldout}

  positives = {k for k in split_set(hard) if k[3]}
  assert positives == {k for k in split_set(easy) if k[3]} == {k for k in split_set(natural)
                                                                if k[3]}
  assert not any(ex.hard_negative for ex in easy.train + easy.heldout)
  assert split_set(hard) <= split_set(natural)
  assert len(natural.train) > len(hard.train)
  easy_per_text = {}
  for ex in hard.train + hard.heldout:
    if not ex.target and not ex.hard_negative:
      easy_per_text[ex.text] = easy_per_text.get(ex.text, 0) + 1
  assert max(easy_per_text.values()) <= 2


def test_mammal_positives_are_mammals():
  not_mammals = {'eagle', 'salmon', 'shark', 'penguin', 'ant', 'ants', 'frog', 'lizard', 'trout',
                 'sparrow', 'crow', 'crows', 'whale shark', 'catfish', 'bird', 'birds', 'fish'}
  positives = {w.lower() for w in _marked_words('mammal', 'positive')}
  assert not positives & not_mammals
  assert {'whale', 'bat', 'platypus'} <= positives
  assert {'whale shark', 'penguin', 'eagle'} <= {w.lower() for w in
                                                 _marked_words('mammal', 'hard_negative')}


def test_animal_traps_are_hard_negatives():
  hard = set(_marked_words('animal', 'hard_negative'))
  assert {'Jaguar', 'mouse', 'bull', 'oak', 'tulips'} <= hard
  positives = {w.lower() for w in _marked_words('animal', 'positive')}
  assert not positives & {'oak', 'tulips', 'chairs', 'mushrooms', 'hot dogs', 'jaguar'}
  row = next(r for r in _rows('animal') if 'Jaguar' in r['text'])
  s = row['text'].index('Jaguar')
  assert [s, s + len('Jaguar')] in row['hard_negative']


def test_chinese_positives_are_han_only():
  for word in _marked_words('chinese', 'positive'):
    assert not KANA.search(word) and not HANGUL.search(word), word
    assert all(HAN.match(c) for c in word) and len(word) <= 4, word
  hard = _marked_words('chinese', 'hard_negative')
  assert any(KANA.search(w) for w in hard) and any(HANGUL.search(w) for w in hard)
  assert any(HAN.search(w) and not KANA.search(w) for w in hard), 'kanji-only hard negatives'


def test_number_pronoun_one_is_not_positive():
  seen = 0
  for row in _rows('number'):
    for m in re.finditer(r'\b[Nn]o one\b', row['text']):
      span = [m.end() - 3, m.end()]
      assert span not in row['positive'] and span in row['hard_negative'], row['text']
      seen += 1
  assert seen >= 2
  ordinals = {'first', 'second', 'third', '21st', 'tenth'}
  assert not ordinals & {w.lower() for w in _marked_words('number', 'positive')}
  assert {'1,000', '3.5', 'seven', 'dozen'} & set(_marked_words('number', 'positive'))


def test_unknown_feature_names_the_available_ones():
  with pytest.raises(FeatureError) as info:
    load_synthetic_feature('reptile')
  for name in SYNTHETIC_FEATURES:
    assert name in str(info.value)
  with pytest.raises(FeatureError, match='hard'):
    load_synthetic_feature('animal', negatives='medium')


# --- activation records ---------------------------------------------------------------------


@pytest.fixture(scope='module')
def tokenizer():
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer
  return load_tokenizer(default_gguf_path())


def _write(tmp_path, records, name='feat.jsonl'):
  path = tmp_path / name
  lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(path)


def _model_tokens(tokenizer, text):
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  return enc['input_ids'], [text[s:e] for s, e in enc['offset_mapping']]


TEXT = 'The cat sat on the warm mat near the door.'


def _acts_for(tokens):
  return [5.0 if t.strip() == 'cat' else 0.5 if t.strip() == 'mat' else 0.0 for t in tokens]


@pytest.mark.parametrize('fmt', ['text+tokens', 'tokens', 'text+token_ids'])
def test_records_round_trip(tmp_path, tokenizer, fmt):
  ids, tokens = _model_tokens(tokenizer, TEXT)
  assert ''.join(tokens) == TEXT
  acts = _acts_for(tokens)
  record = {'text+tokens': {'text': TEXT, 'tokens': tokens, 'activations': acts},
            'tokens': {'tokens': tokens, 'activations': acts, 'feature_id': 7},
            'text+token_ids': {'text': TEXT, 'token_ids': ids, 'activations': acts}}[fmt]
  feature = load_records(_write(tmp_path, [record]), tokenizer, threshold=1.0,
                         heldout_fraction=0.0, max_negatives_per_text=None,
                         reference_word='cat')
  assert feature.name == 'feat' and feature.reference_word == 'cat' and not feature.heldout
  assert [ex.word for ex in feature.train] == [t.strip() for t in tokens if t.strip()]
  by_word = {ex.word: ex for ex in feature.train}
  assert by_word['cat'].target == 1.0 and by_word['cat'].activation == 5.0
  assert by_word['mat'].target == 0.0 and by_word['mat'].activation == 0.5
  assert all(ex.text == TEXT for ex in feature.train)


def test_records_realigned_to_model_tokens_with_max(tmp_path, tokenizer):
  chars = list(TEXT)
  acts = [0.0] * len(chars)
  cat = TEXT.index('cat')
  acts[cat], acts[cat + 1], acts[cat + 2] = 1.0, 4.0, 2.0  # peak inside the word
  path = _write(tmp_path, [{'tokens': chars, 'activations': acts}])
  feature = load_records(path, tokenizer, heldout_fraction=0.0, max_negatives_per_text=None)
  _, tokens = _model_tokens(tokenizer, TEXT)
  assert [ex.word for ex in feature.train] == [t.strip() for t in tokens if t.strip()]
  positives = [ex for ex in feature.train if ex.target]
  assert [(ex.word, ex.activation) for ex in positives] == [('cat', 4.0)]


def test_records_multibyte_characters(tmp_path, tokenizer):
  text = 'We ordered 红烧肉 and rice.'
  chars = list(text)
  acts = [3.0 if c == '烧' else 0.0 for c in chars]
  path = _write(tmp_path, [{'text': text, 'tokens': chars, 'activations': acts}])
  feature = load_records(path, tokenizer, heldout_fraction=0.0, max_negatives_per_text=None)
  words = [ex.word for ex in feature.train]
  assert len(words) == len(set((ex.start, ex.end) for ex in feature.train))  # no duplicate spans
  assert [ex.word for ex in feature.train if ex.target] == ['烧']
  assert '红' in words and '肉' in words


def test_records_token_ids_of_another_segmentation(tmp_path, tokenizer):
  text = 'The cat sat.'
  ids = [i for ch in text for i in tokenizer(ch, add_special_tokens=False)['input_ids']]
  assert tokenizer.decode(ids) == text and len(ids) == len(text)
  acts = [2.0 if ch == 'a' else 0.0 for ch in text]
  path = _write(tmp_path, [{'text': text, 'token_ids': ids, 'activations': acts}])
  feature = load_records(path, tokenizer, heldout_fraction=0.0, max_negatives_per_text=None)
  assert [(ex.word, ex.target) for ex in feature.train] == [
      ('The', 0.0), ('cat', 1.0), ('sat', 1.0), ('.', 0.0)]


def test_records_no_positive_mentions_threshold(tmp_path, tokenizer):
  path = _write(tmp_path, [{'tokens': ['a', ' b'], 'activations': [0.1, 0.3]}])
  with pytest.raises(FeatureError, match='threshold') as info:
    load_records(path, tokenizer, threshold=1.0)
  assert '0.3' in str(info.value)


def test_records_no_negative(tmp_path, tokenizer):
  path = _write(tmp_path, [{'tokens': ['a', ' b'], 'activations': [2.0, 3.0]}])
  with pytest.raises(FeatureError, match='no negative'):
    load_records(path, tokenizer, threshold=1.0)


def test_records_bad_json_names_line(tmp_path, tokenizer):
  path = _write(tmp_path, [{'tokens': ['a'], 'activations': [1.0]}, '{"tokens": ["a"], '])
  with pytest.raises(FeatureError, match='line 2'):
    load_records(path, tokenizer)


def test_records_missing_file_names_path(tmp_path, tokenizer):
  missing = str(tmp_path / 'nope.jsonl')
  with pytest.raises(FeatureFileNotFoundError) as info:
    load_records(missing, tokenizer)
  assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, FeatureError)
  assert missing in str(info.value)


@pytest.mark.parametrize('record, message', [
    ({'tokens': ['a', 'b'], 'activations': [1.0]}, '2 tokens but 1 activations'),
    ({'tokens': ['a', 'b'], 'activations': [1.0, float('nan')]}, 'finite'),
    ({'text': 'ab c', 'tokens': ['ab', 'c'], 'activations': [1.0, 0.0]}, 'concatenate'),
    ({'text': 'abc', 'activations': [1.0]}, 'tokens'),
])
def test_records_bad_record_names_line(tmp_path, tokenizer, record, message):
  good = {'tokens': ['x', ' y'], 'activations': [1.0, 0.0]}
  path = _write(tmp_path, [good, '', record])
  with pytest.raises(FeatureError, match='line 3') as info:
    load_records(path, tokenizer)
  assert message in str(info.value)


def test_records_split_by_record_and_cap(tmp_path, tokenizer):
  records = []
  for i in range(20):
    text = f'Record {i} says the cat sat on the mat again and again and again.'
    _, tokens = _model_tokens(tokenizer, text)
    records.append({'text': text, 'tokens': tokens,
                    'activations': _acts_for(tokens) if i % 2 else [0.0] * len(tokens)})
  path = _write(tmp_path, records)
  feature = load_records(path, tokenizer, threshold=1.0, heldout_fraction=0.25, seed=3,
                         max_negatives_per_text=2)
  train_texts = {ex.text for ex in feature.train}
  heldout_texts = {ex.text for ex in feature.heldout}
  assert not train_texts & heldout_texts
  assert len(heldout_texts) == 5
  assert any(ex.target for ex in feature.train) and any(ex.target for ex in feature.heldout)
  for text in train_texts | heldout_texts:
    assert sum(1 for ex in feature.train + feature.heldout
               if ex.text == text and not ex.target) == 2
  again = load_records(path, tokenizer, threshold=1.0, heldout_fraction=0.25, seed=3,
                       max_negatives_per_text=2)
  assert again == feature
  other = load_records(path, tokenizer, threshold=1.0, heldout_fraction=0.25, seed=4,
                       max_negatives_per_text=2)
  assert {ex.text for ex in other.heldout} != heldout_texts




def test_joined_synthetic_records_are_passages_of_consecutive_sentences():
  """``--join N``: each record is N sentences in order, their pieces and activations kept."""
  from tokenspace_jax.features.synthetic_records import synthetic_records
  single = synthetic_records('animal')
  joined = synthetic_records('animal', join=3)
  assert len(joined) == -(-len(single) // 3)
  for k, r in enumerate(joined):
    parts = single[3 * k:3 * k + 3]
    assert r['text'] == ' '.join(p['text'] for p in parts)
    assert ''.join(r['tokens']) == r['text'] and len(r['tokens']) == len(r['activations'])
    assert sum(r['activations']) == sum(sum(p['activations']) for p in parts) > 0
