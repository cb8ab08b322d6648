"""Activation records that must not kill a job or be labeled garbled: bad lines, long records,
tokenizer alphabets, scripts without per-letter tokens, invisible characters."""

import json
import logging

import pytest

from tokenspace_jax.features import FeatureError, load_records, load_synthetic_feature
from tokenspace_jax.features.grouped_records import read_grouped_records
from tokenspace_jax.features.token_markers import detect_scheme, normalize_tokens


@pytest.fixture(scope='module')
def tokenizer():
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer
  return load_tokenizer(default_gguf_path())


GOOD = {'tokens': ['The', ' cat', ' sat', ' on', ' the', ' mat', '.'],
        'activations': [0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]}


def _write_bytes(tmp_path, lines, name='feat.jsonl'):
  path = tmp_path / name
  path.write_bytes(b'\n'.join(line if isinstance(line, bytes) else
                              json.dumps(line, ensure_ascii=False).encode() for line in lines)
                   + b'\n')
  return str(path)


def _bad_lines(tokenizer):
  ids = tokenizer('The cat sat.', add_special_tokens=False)['input_ids']
  acts = [0.0] * len(ids)
  return {
      'negative id': json.dumps({'text': 'The cat sat.', 'token_ids': [-1] + ids[1:],
                                 'activations': acts}).encode(),
      'huge id': (b'{"text": "The cat sat.", "token_ids": [1' + b'0' * 400 + b', '
                  + ', '.join(map(str, ids[1:])).encode() + b'], "activations": '
                  + json.dumps(acts).encode() + b'}'),
      'id past vocabulary': json.dumps({'text': 'The cat sat.', 'token_ids': ids[:-1] + [
          len(tokenizer)], 'activations': acts}).encode(),
      'huge activation': (b'{"tokens": ["a", " b"], "activations": [1' + b'0' * 400 + b', 0]}'),
      'too many digits': b'{"tokens": ["a"], "activations": [' + b'9' * 5000 + b']}',
      'deep nesting': b'{"tokens": ' + b'[' * 100_000 + b']' * 100_000 + b'}',
      'not UTF-8': b'{"tokens": ["caf\xe9"], "activations": [1.0]}',
      'lone surrogate': b'{"tokens": ["a\\ud800"], "activations": [1.0]}',
  }


BAD_LINE_MESSAGES = {
    'negative id': 'outside the vocabulary', 'huge id': 'outside the vocabulary',
    'id past vocabulary': 'outside the vocabulary', 'huge activation': 'finite',
    'too many digits': 'unreadable JSON', 'deep nesting': 'nested too deeply',
    'not UTF-8': 'not UTF-8', 'lone surrogate': 'lone surrogate',
}


@pytest.mark.parametrize('kind', sorted(BAD_LINE_MESSAGES))
def test_bad_line_is_one_clear_error_in_load_records(tmp_path, tokenizer, kind):
  path = _write_bytes(tmp_path, [GOOD, _bad_lines(tokenizer)[kind]])
  with pytest.raises(FeatureError, match='line 2') as info:
    load_records(path, tokenizer)
  assert BAD_LINE_MESSAGES[kind] in str(info.value)
  assert len(str(info.value)) < 400 and '\n' not in str(info.value)


def test_bad_lines_are_skipped_in_a_batch(tmp_path, tokenizer):
  bad = _bad_lines(tokenizer)
  lines = []
  for _ in range(6):
    lines.append(dict(GOOD, feature_id='cat'))
    lines.append(dict(GOOD, feature_id='cat', activations=[0.0] * 7))
  first_bad = len(lines) + 1
  for kind in sorted(bad):
    rec = json.loads(bad[kind]) if kind in ('negative id', 'id past vocabulary') else None
    lines.append(json.dumps(dict(rec, feature_id='cat')).encode() if rec else
                 bad[kind].replace(b'{', b'{"feature_id": "cat", ', 1))
  path = _write_bytes(tmp_path, lines)
  grouped = read_grouped_records(path, tokenizer, heldout_fraction=0.3)
  assert grouped.feature_ids == ['cat']
  assert sorted(p.line for p in grouped.problems) == list(range(first_bad,
                                                                first_bad + len(bad)))
  for p, kind in zip(sorted(grouped.problems, key=lambda p: p.line), sorted(bad), strict=True):
    assert BAD_LINE_MESSAGES[kind] in p.error, (kind, p.error)


def test_utf8_byte_order_mark_is_accepted(tmp_path, tokenizer):
  path = tmp_path / 'bom.jsonl'
  path.write_bytes(b'\xef\xbb\xbf' + json.dumps(GOOD).encode() + b'\n')
  feature = load_records(str(path), tokenizer, heldout_fraction=0.0)
  assert [e.word for e in feature.train if e.target] == ['cat']


# --- windows ---------------------------------------------------------------------------------


def test_long_records_are_cut_into_windows_with_their_activations(tmp_path, tokenizer):
  words = [f' w{i}' for i in range(150)]
  acts = [7.0 if i in (3, 70, 149) else 0.0 for i in range(150)]
  path = _write_bytes(tmp_path, [{'tokens': words, 'activations': acts}])
  feature = load_records(path, tokenizer, heldout_fraction=0.0, max_negatives_per_text=None,
                         window=64)
  texts = sorted({e.text for e in feature.train}, key=lambda t: int(t.split()[0][1:]))
  assert texts == [''.join(words[:64]), ''.join(words[64:128]), ''.join(words[128:])]
  assert sorted({e.window for e in feature.train}) == [0, 1, 2]
  positives = sorted((e.word, e.window) for e in feature.train if e.target)
  assert positives == [('w149', 2), ('w3', 0), ('w70', 1)]
  for e in feature.train:
    assert e.text == texts[e.window]
  whole = load_records(path, tokenizer, heldout_fraction=0.0, window=None)
  assert {e.text for e in whole.train} == {''.join(words)}


def test_window_is_the_unit_of_the_split(tmp_path, tokenizer):
  words = [f' w{i}' for i in range(400)]
  acts = [5.0 if i % 40 == 7 else 0.0 for i in range(400)]
  path = _write_bytes(tmp_path, [{'tokens': words, 'activations': acts}])
  feature = load_records(path, tokenizer, heldout_fraction=0.3, window=40)
  train_windows = {e.window for e in feature.train}
  heldout_windows = {e.window for e in feature.heldout}
  assert train_windows and heldout_windows and not train_windows & heldout_windows
  assert not {e.text for e in feature.train} & {e.text for e in feature.heldout}


def test_window_cut_never_splits_a_character(tmp_path, tokenizer):
  text = '红烧肉很好吃' * 6
  ids = tokenizer(text, add_special_tokens=False)['input_ids']
  assert len(ids) > len(text)  # byte pieces: some characters take several tokens
  acts = [1.0 if i % 5 == 0 else 0.0 for i in range(len(ids))]
  path = _write_bytes(tmp_path, [{'text': text, 'token_ids': ids, 'activations': acts}])
  for window in (3, 7, 10):
    feature = load_records(path, tokenizer, heldout_fraction=0.0, max_negatives_per_text=None,
                           window=window)
    by_window = {e.window: e.text for e in feature.train}
    assert ''.join(by_window[k] for k in sorted(by_window)) == text
    assert '\ufffd' not in ''.join(by_window.values())


def test_window_must_be_positive(tmp_path, tokenizer):
  path = _write_bytes(tmp_path, [GOOD])
  with pytest.raises(FeatureError, match='window'):
    load_records(path, tokenizer, window=0)


# --- tokenizer alphabets ---------------------------------------------------------------------


TRICKY = 'Un café\tcoûte 3 €.\nLe 红烧肉 aussi, naïve!'


def test_byte_level_pieces_without_text_are_normalised(tmp_path, tokenizer):
  enc = tokenizer(TRICKY, add_special_tokens=False, return_offsets_mapping=True)
  pieces = tokenizer.convert_ids_to_tokens(enc['input_ids'])
  assert 'Ġ' in ''.join(pieces) and 'Ċ' in ''.join(pieces) and 'ĉ' in ''.join(pieces)
  start = TRICKY.index('naïve')
  acts = [3.0 if s < start + 5 and start < e else 0.0 for s, e in enc['offset_mapping']]
  path = _write_bytes(tmp_path, [{'tokens': pieces, 'activations': acts}])
  feature = load_records(path, tokenizer, heldout_fraction=0.0, max_negatives_per_text=None)
  assert {e.text for e in feature.train} == {TRICKY}
  assert {'café', 'coûte', '€', 'naïve', '红', '烧', '肉'} <= {e.word for e in feature.train}
  assert [e.word for e in feature.train if e.target] == ['naïve']


def test_sentencepiece_pieces_are_normalised():
  tokens = ['▁Le', '▁ch', 'at', '<0x0A>', '▁', '<0xE7>', '<0xBA>', '<0xA2>', '▁dort']
  acts = [0.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.5, 0.0, 0.0]
  out, out_acts = normalize_tokens(tokens, acts, 'here')
  assert ''.join(out) == ' Le chat\n 红 dort'
  assert out[-3:] == [' ', '红', ' dort'] and out_acts[-3:] == [0.0, 2.0, 0.0]


@pytest.mark.parametrize('tokens, message', [
    (['ĠThe', 'Ġ世界'], 'no byte symbol'),
    (['▁The', 'Ġcat'], 'mix SentencePiece'),
    (['ĠThe', 'Ġcaf', 'Ã'], 'not UTF-8'),
    (['The', ' caf', '\ufffd'], 'U+FFFD'),
])
def test_tokens_that_cannot_be_normalised_are_refused(tmp_path, tokenizer, tokens, message):
  path = _write_bytes(tmp_path, [GOOD, {'tokens': tokens, 'activations': [1.0] * len(tokens)}])
  with pytest.raises(FeatureError, match='line 2') as info:
    load_records(path, tokenizer)
  assert message in str(info.value)


def test_scheme_detection():
  assert detect_scheme(['The', ' cat']) == 'plain'
  assert detect_scheme(['Ġcaf', 'Ã©']) == 'byte_level'
  assert detect_scheme(['caf', 'Ã©']) == 'byte_level'  # mojibake without a space marker
  assert detect_scheme(['łódź', ' café']) == 'plain'  # decoded text with Latin-1 letters
  assert detect_scheme(['▁cat']) == 'sentencepiece'


# --- words by Unicode rules ------------------------------------------------------------------


@pytest.mark.parametrize('text, words', [
    ('אני אוהב חתולים שחורים', ['אני', 'אוהב', 'חתולים', 'שחורים']),
    ('أحب القطط السوداء', ['أحب', 'القطط', 'السوداء']),
    ('Ich mag schwarze Katzen', ['Ich', 'mag', 'schwarze', 'Katzen']),
])
def test_words_of_spaced_scripts_are_one_example_each(tmp_path, tokenizer, text, words):
  chars = list(text)
  third = text.index(words[2])
  acts = [4.0 if third <= i < third + len(words[2]) and i % 2 else 0.0 for i in range(len(text))]
  path = _write_bytes(tmp_path, [{'tokens': chars, 'activations': acts}])
  feature = load_records(path, tokenizer, heldout_fraction=0.0, max_negatives_per_text=None)
  assert [e.word for e in feature.train] == words
  assert [e.word for e in feature.train if e.target] == [words[2]]


def test_invisible_and_blank_pieces_never_become_examples(tmp_path, tokenizer):
  tokens = ['Hello', '\u200d', ' ', '\u202e', 'world', '\u200b', ' \t', '\u2060', '!', '\ufeff']
  acts = [0.0, 5.0, 5.0, 5.0, 3.0, 5.0, 5.0, 5.0, 0.0, 5.0]
  path = _write_bytes(tmp_path, [{'tokens': tokens, 'activations': acts}])
  feature = load_records(path, tokenizer, threshold=2.0, heldout_fraction=0.0,
                         max_negatives_per_text=None)
  assert [e.word for e in feature.train] == ['Hello', 'world', '!']
  assert [e.word for e in feature.train if e.target] == ['world']


def test_han_characters_stay_separate_examples(tmp_path, tokenizer):
  text = '我们吃红烧肉'
  acts = [3.0 if c == '烧' else 0.0 for c in text]
  path = _write_bytes(tmp_path, [{'tokens': list(text), 'activations': acts}])
  feature = load_records(path, tokenizer, heldout_fraction=0.0, max_negatives_per_text=None)
  assert [e.word for e in feature.train if e.target] == ['烧']


# --- negative activations, windows of examples, meta -----------------------------------------


def test_negative_activations_are_negatives_and_logged_once(tmp_path, tokenizer, caplog):
  rec = {'tokens': ['The', ' cat', ' sat'], 'activations': [-3.0, 2.0, -1.0]}
  path = _write_bytes(tmp_path, [rec, rec, rec])
  with caplog.at_level(logging.WARNING, logger='tokenspace_jax'):
    feature = load_records(path, tokenizer, heldout_fraction=0.0, max_negatives_per_text=None)
  warnings = [r for r in caplog.records if 'negative' in r.getMessage()]
  assert len(warnings) == 1 and '6 activations' in warnings[0].getMessage()
  assert {(e.word, e.target) for e in feature.train} == {('The', 0.0), ('cat', 1.0),
                                                         ('sat', 0.0)}
  assert min(e.activation for e in feature.train) == -3.0


def test_synthetic_examples_carry_one_window_per_sentence():
  feature = load_synthetic_feature('animal')
  examples = feature.train + feature.heldout
  by_window = {}
  for e in examples:
    by_window.setdefault(e.window, set()).add(e.text)
  assert all(len(texts) == 1 for texts in by_window.values())
  assert len(by_window) == len({e.text for e in examples}) > 100


def test_grouped_features_keep_first_source_and_explanation(tmp_path, tokenizer):
  src = {'format': 'neuronpedia', 'modelId': 'gpt2-small', 'layer': '8-res-jb', 'index': '12'}
  lines = [dict(GOOD, feature_id='a', source=src, explanation='cats and kittens')]
  lines += [dict(GOOD, feature_id='a', source={'format': 'other'}, explanation='later')] * 5
  lines += [dict(GOOD, feature_id='a', activations=[0.0] * 7)] * 6
  lines += [dict(GOOD, feature_id='b')] * 4 + [dict(GOOD, feature_id='b',
                                                    activations=[0.0] * 7)] * 4
  path = _write_bytes(tmp_path, lines)
  grouped = read_grouped_records(path, tokenizer, heldout_fraction=0.3)
  a, b = grouped.features
  assert a.meta == {'source': src, 'explanation': 'cats and kittens'}
  assert b.meta == {}
  assert a.reference_word == ''
