"""Generated docs are current, and the documented examples still load.

docs/configuration.md is written by experiments/config_reference.py from the configs' defaults;
regenerating it here and comparing keeps it from drifting when a key, default, comment, choice
or config file changes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGENERATE = 'run `python experiments/config_reference.py`'


def _module(relpath: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(relpath)[:-3],
                                                os.path.join(ROOT, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_configuration_reference_is_current(tmp_path):
  out = tmp_path / 'configuration.md'
  subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'config_reference.py'),
                  f'--out={out}'], check=True, capture_output=True, text=True)
  with open(os.path.join(ROOT, 'docs', 'configuration.md'), encoding='utf-8') as f:
    committed = f.read()
  assert committed == out.read_text(encoding='utf-8'), (
      f'docs/configuration.md is out of date: {REGENERATE}.')


def test_configuration_reference_covers_every_key_and_choice():
  from tokenspace_jax import config_defaults

  ref = _module('experiments/config_reference.py')
  text, _, missing, _ = ref.render()
  assert not missing, (f'Config keys or choices without a description: {missing}. Add a comment '
                       'next to the key in config_defaults.py (or a CHOICE_NOTES entry), then '
                       f'{REGENERATE}.')
  for key, value in ref.flatten(config_defaults.get_base_config()).items():
    assert f'| `{key}` | {ref.show(value)} |' in text, key
  for key, choices in config_defaults.CHOICES.items():
    for choice in choices:
      assert f'| `{key}` | `{choice}` |' in text, (key, choice)


def test_comments_in_config_defaults_are_read():
  """The meaning of a key comes from its comment in config_defaults.py, not a copy."""
  comments, order = _module('experiments/config_reference.py').source_comments()
  assert comments['model.source'].startswith('HF folder, .gguf file')
  assert comments['early_stop.patience'].startswith('... for this many steps')
  assert order[:2] == ['seed', 'steps'] and 'prompt.few_shot' in order


def test_own_feature_example_records_load_as_documented():
  """docs/own_feature.md's worked example: the file loads with the documented flags."""
  from tokenspace_jax.features import load_records
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(default_gguf_path())
  feature = load_records(os.path.join(ROOT, 'docs', 'examples', 'colors.jsonl'), tokenizer,
                         threshold=0.5, heldout_fraction=0.3, reference_word=' color')
  train_pos = sum(e.target for e in feature.train)
  heldout_pos = sum(e.target for e in feature.heldout)
  # The numbers quoted in docs/own_feature.md (the train split is capped to 192 by the run).
  assert (len(feature.heldout), heldout_pos) == (85, 13)
  assert train_pos > 30
  assert all(e.word.strip().lower() in _make_colors().COLORS for e in feature.train if e.target)


def _make_colors():
  return _module('docs/examples/make_colors.py')


def test_colors_example_file_is_what_its_generator_writes(tmp_path, monkeypatch):
  module = _make_colors()
  monkeypatch.setattr(module, 'OUT', str(tmp_path / 'colors.jsonl'))
  module.main()
  with open(os.path.join(ROOT, 'docs', 'examples', 'colors.jsonl'), encoding='utf-8') as f:
    assert f.read() == (tmp_path / 'colors.jsonl').read_text(encoding='utf-8'), (
        'docs/examples/colors.jsonl is out of date: run `python docs/examples/make_colors.py`.')
