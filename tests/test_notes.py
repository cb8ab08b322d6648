"""prompt.note: the judge's own reading of each text, asked once per text and shown after it."""

from __future__ import annotations

import json
import types

import pytest

from tokenspace_jax import config_defaults, main
from tokenspace_jax.classifier import notes, prompts
from tokenspace_jax.config_defaults import ConfigValueError
from tokenspace_jax.models import load_model
from tokenspace_jax.outputs import views


@pytest.fixture(scope='module')
def tiny_lm(tiny_folder):
  return load_model(tiny_folder)


def _quick(**changes):
  c = config_defaults.apply_arg(config_defaults.get_base_config(), 'quick')
  c.feature.name = 'chinese'
  c.steps = 2
  c.early_stop.prob = 0.0
  c.progress = False
  return config_defaults.override(c, changes)


@pytest.mark.parametrize('answer, word', [
    (' Chinese.', 'Chinese'), (' Japanese\n\nExplanation:', 'Japanese'), ('中文。', '中文'),
    ('  ', 'unknown'), (' "Korean"', '"Korean'), ('English, which is a', 'English')])
def test_first_word_of_an_answer(answer, word):
  assert notes.first_word(answer) == word


def test_note_is_read_once_per_text_and_follows_the_text_in_every_prompt(tiny_lm, tmp_path,
                                                                         monkeypatch):
  asked, encoded = [], []
  real_read, real_encode = notes.read_texts, prompts.encode_prompts

  def read(lm, texts, note, batch=32):
    asked.append(list(texts))
    return real_read(lm, texts, note, batch=batch)

  def encode(template, tokenizer, items, **kw):
    encoded.append(list(items))
    return real_encode(template, tokenizer, items, **kw)

  monkeypatch.setattr(notes, 'read_texts', read)
  monkeypatch.setattr(prompts, 'encode_prompts', encode)
  result = main.run(_quick(**{'prompt.note': 'language'}), str(tmp_path), lm=tiny_lm)
  (texts,), (items,) = asked, encoded
  distinct = set(texts)
  assert sum(result['notes'].values()) == len(distinct) > 1
  read_again = real_read(tiny_lm, sorted(distinct), 'language')  # greedy: the same answers
  line = config_defaults.PROMPT_NOTES['language'][2]
  for shown, word in items:
    text, _, last = shown.rpartition('\n')
    assert text in distinct and word in text
    assert last == line.format(answer=read_again[text])
  assert set(result['notes']) == set(read_again.values())
  assert result['config']['prompt']['note'] == 'language'
  assert 0 < result['phase_seconds']['notes'] < result['phase_seconds']['pool']
  (shown,) = [x for x in views.summary(result).splitlines()
               if x.startswith('  (the judge read the texts as: ')]
  assert all(f'{answer} {count}' in shown for answer, count in result['notes'].items())


def test_without_a_note_the_prompts_show_the_texts_alone(tiny_lm, tmp_path, monkeypatch):
  encoded = []
  real_encode = prompts.encode_prompts
  monkeypatch.setattr(prompts, 'encode_prompts',
                      lambda t, tok, items, **kw: encoded.append(list(items))
                      or real_encode(t, tok, items, **kw))
  monkeypatch.setattr(notes, 'read_texts', lambda *a, **k: pytest.fail('no note was asked for'))
  result = main.run(_quick(), str(tmp_path), lm=tiny_lm)
  assert 'notes' not in result
  assert result['phase_seconds']['notes'] == 0
  assert not any('Language of the text' in text for text, _ in encoded[0])


def test_a_note_needs_a_chat_template_and_a_known_name():
  plain = types.SimpleNamespace(tokenizer=types.SimpleNamespace(chat_template=None))
  with pytest.raises(prompts.PromptError, match='chat template.*prompt.note=""'):
    notes.read_texts(plain, ['Some text.'], 'language')
  with pytest.raises(ConfigValueError, match="prompt.note='mood' is not one of '', 'language'"):
    config_defaults.validate(_quick(**{'prompt.note': 'mood'}))
  preset = config_defaults.apply_arg(config_defaults.get_base_config(), 'question_note_chat')
  assert preset.prompt.note == 'language'
  assert preset.prompt.user == config_defaults.QUESTION_CHAT_PROMPT['user']


def test_answers_are_those_of_greedy_generation_of_each_whole_prompt(tiny_lm):
  """The prefix pass and the tokens after it give what generating each whole prompt gives."""
  from tokenspace_jax.models.generate import chat_prompt_ids, greedy_generate
  texts = ['The cat sat on the mat.', '我们今天去公园散步。', 'A dog.', 'x',
           '東京に住んでいます。', 'Three apples and two pears were on the table today.']
  question, answer_start, _ = config_defaults.PROMPT_NOTES['language']
  tok = tiny_lm.tokenizer
  start = tok.encode(answer_start, add_special_tokens=False)
  expected = {}
  for t in texts:
    (new,) = greedy_generate(tiny_lm.model, tiny_lm.params, tok,
                             chat_prompt_ids(tok, question.format(text=t)) + start,
                             notes._ANSWER_TOKENS)
    expected[t] = notes.first_word(tok.decode(new, skip_special_tokens=True))
  assert len(set(expected.values())) > 1  # the texts do get different answers
  assert notes.read_texts(tiny_lm, texts + texts[:2], 'language', batch=4) == expected
  assert notes.read_texts(tiny_lm, texts[3:4], 'language') == {texts[3]: expected[texts[3]]}


@pytest.mark.parametrize('answer, complete', [
    (' Chinese', False), (' Chinese.', False), (' Chinese.\n', True), (' Cant', False),
    ('  ', False), (' Chinese and', True)])
def test_an_answer_is_read_until_its_first_word_is_complete(answer, complete):
  assert notes._word_complete(answer) is complete


@pytest.mark.slow  # three tiny runs, about a minute
def test_a_resumed_run_reads_its_kept_notes_instead_of_asking_again(tiny_lm, tmp_path,
                                                                     monkeypatch):
  config = _quick(**{'prompt.note': 'language'})
  first = main.run(config, str(tmp_path), lm=tiny_lm)
  kept = tmp_path / 'notes.json'
  saved = json.loads(kept.read_text())
  assert saved['note'] == 'language' and len(saved['answers']) == sum(first['notes'].values())
  real_read = notes.read_texts
  (tmp_path / 'result.json').unlink()  # killed after its last checkpoint, before the result
  monkeypatch.setattr(notes, 'read_texts', lambda *a, **k: pytest.fail('the notes were kept'))
  again = main.run(config, str(tmp_path), lm=tiny_lm)
  assert again['notes'] == first['notes'] and again['label'] == first['label']

  # Unreadable kept notes are read again, and kept anew.
  kept.write_text('{"note": "language", "answers": [1, 2')
  (tmp_path / 'result.json').unlink()
  asked = []
  monkeypatch.setattr(notes, 'read_texts',
                      lambda lm, texts, note, **k: asked.append(texts) or real_read(lm, texts,
                                                                                    note, **k))
  third = main.run(config, str(tmp_path), lm=tiny_lm)
  assert len(asked) == 1 and third['notes'] == first['notes']
  assert json.loads(kept.read_text()) == saved


@pytest.mark.parametrize('content, note, expected', [
    ('{"note": "language", "answers": {"Some text.": "English"}}', 'language',
     {'Some text.': 'English'}),
    ('{"note": "mood", "answers": {"Some text.": "calm"}}', 'language', {}),  # another note
    ('{"note": "language", "answers": [1, 2', 'language', {}),  # cut short
    ('[1, 2]', 'language', {}),
    (None, 'language', {}),  # none kept
    ('{"note": "language", "answers": {"Some text.": "English"}}', '', {}),  # no note asked
])
def test_kept_notes_are_used_only_when_whole_and_of_the_same_note(tmp_path, caplog, content,
                                                                   note, expected):
  from tokenspace_jax.outputs import checkpoint
  path = checkpoint.notes_path(str(tmp_path / 'checkpoints'))
  assert path == str(tmp_path / 'notes.json')
  if content is not None:
    (tmp_path / 'notes.json').write_text(content)
  with caplog.at_level('WARNING', logger='tokenspace_jax'):
    assert checkpoint.load_notes(path, note) == expected
  assert ('unreadable' in caplog.text) == (content is not None and note != ''
                                           and not content.endswith('}}'))
  checkpoint.save_notes(path, 'language', {'Other text.': 'French'})
  assert checkpoint.load_notes(path, 'language') == {'Other text.': 'French'}
