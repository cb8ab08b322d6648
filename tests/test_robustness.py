"""Issue #13 end to end: each bad input and fault met through ``main`` and ``batch`` as a user
meets it, on one tiny random model (docs/robustness.md lists the cases and these tests).

The unit tests (test_outputs_*.py, test_records_robustness.py) check each guard alone; these
check that the commands reach them: that the check runs before anything is written, that the
message is one line, and that the other features of a batch job are still labeled. One finished
``main`` run and one finished ``batch`` run are shared; subprocesses only where the command line
itself is tested, run side by side.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import types

import pytest
from test_outputs_storage import Mounts

from tokenspace_jax import batch, cli, config_defaults, main
from tokenspace_jax.config_defaults import ConfigValueError
from tokenspace_jax.engine import pool as pool_lib
from tokenspace_jax.engine.run import default_workdir
from tokenspace_jax.features import FeatureError
from tokenspace_jax.features.synthetic_records import synthetic_records
from tokenspace_jax.features.token_markers import _byte_alphabet
from tokenspace_jax.models import load_model
from tokenspace_jax.outputs import checkpoint, storage
from tokenspace_jax.outputs.checkpoint import Checkpointer
from tokenspace_jax.outputs.workdir import InputChangedError, Workdir, WorkdirInUseError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ('wall_seconds', 'descent_seconds', 'steps_per_second', 'compile_seconds',
           'phase_seconds')

# A quick main run that stops early: every step counts as confident, so it stops at step 3.
MAIN = {'steps': 8, 'checkpoint_every': 2, 'early_stop.prob': 1e-9, 'early_stop.patience': 3,
        'feature.name': '', 'feature.max_train': 16, 'feature.max_heldout': 12,
        'eval.calibration_examples': 8, 'eval.num_random': 2, 'eval.bootstrap': 50,
        'choice.top_k': 2, 'choice.examples': 16, 'data.batch_size': 8, 'progress': False}
BATCH = {'steps': 2, 'checkpoint_every': 1, 'early_stop.prob': 0.0, 'feature.max_train': 8,
         'feature.max_heldout': 6, 'eval.calibration_examples': 4, 'eval.num_random': 1,
         'eval.bootstrap': 50, 'choice.top_k': 2, 'choice.examples': 8, 'data.batch_size': 4,
         'batch.features_per_step': 5}
BATCH_FEATURES = ['animal', 'bpe', 'sp', 'rtl', 'long']

HEBREW = [('אני אוהב חתולים שחורים', 'חתולים'), ('הכלב רץ בגן הגדול', 'הכלב'),
          ('ראיתי סוס לבן אתמול', 'סוס'), ('הציפור שרה בבוקר', 'הציפור')]
ARABIC = [('أحب القطط السوداء كثيرا', 'القطط'), ('الكلب يجري في الحديقة', 'الكلب'),
          ('رأيت حصانا أبيض أمس', 'حصانا'), ('الطائر يغني في الصباح', 'الطائر')]


def bad_lines() -> dict[str, bytes]:
  """One records line of each kind that used to crash a whole job, by the cause it is named
  for in skipped.jsonl."""
  return {
      'outside the vocabulary': json.dumps({'feature_id': 'animal', 'text': 'A cat',
                                            'token_ids': [-1, 5],
                                            'activations': [0, 1]}).encode(),
      'an integer of 401 digits': (b'{"feature_id": "animal", "text": "A cat", "token_ids": [1'
                                   + b'0' * 400 + b', 5], "activations": [0, 1]}'),
      'nested too deeply': b'{"feature_id": "animal", "x": ' + b'[' * 100_000
                           + b']' * 100_000 + b'}',
      'not UTF-8': b'{"feature_id": "animal", "tokens": ["A", " c\xffat"], '
                   b'"activations": [0, 1]}',
  }


def long_record(words: int = 10_000) -> dict:
  """One record of ``words`` words, firing on the animals (the issue's 18.5 GB allocation)."""
  vocab = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'dog', 'river', 'horse', 'tree', 'bird']
  tokens = [('' if i == 0 else ' ') + vocab[(i * 7 + i // 11) % len(vocab)] for i in range(words)]
  acts = [1.0 if t.strip() in ('cat', 'dog', 'horse', 'bird') else 0.0 for t in tokens]
  return {'tokens': tokens, 'activations': acts}


def _marked(record: dict, scheme: str) -> dict:
  """``record``'s tokens as raw tokenizer pieces (Ġ byte-level BPE or ▁ SentencePiece), without
  the text: what a dashboard exporting raw pieces writes."""
  if scheme == 'bpe':
    to_char = {b: c for c, b in _byte_alphabet().items()}
    tokens = [''.join(to_char[b] for b in t.encode('utf-8')) for t in record['tokens']]
  else:
    tokens = [t.replace(' ', '\u2581') for t in record['tokens']]
  return {'feature_id': scheme, 'tokens': tokens, 'activations': record['activations']}


def _rtl_record(text: str, word: str) -> dict:
  """One token per letter, as a byte-level tokenizer splits Hebrew and Arabic, firing on every
  other letter of ``word`` only: a per-letter split would make examples of single letters."""
  start = text.index(word)
  acts = [2.0 if start <= i < start + len(word) and i % 2 else 0.0 for i in range(len(text))]
  return {'feature_id': 'rtl', 'tokens': list(text), 'activations': acts}


@pytest.fixture(scope='module')
def model_dir(tiny_folder, tmp_path_factory):
  """A copy of the tiny model, so a test may change it in place (and put it back)."""
  folder = tmp_path_factory.mktemp('model') / 'tiny'
  shutil.copytree(tiny_folder, folder)
  return str(folder)


@pytest.fixture(scope='module')
def tiny_lm(model_dir):
  return load_model(model_dir)


def main_config(records, source, **changes):
  c = config_defaults.apply_arg(config_defaults.get_base_config(), 'quick')
  return config_defaults.override(c, {**MAIN, 'feature.records': str(records),
                                      'model.source': str(source), **changes})


def batch_config(records, source, **changes):
  spec = importlib.util.spec_from_file_location('batch_config',
                                                os.path.join(ROOT, 'configs', 'batch.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_defaults.override(module.get_config(), {
      **BATCH, 'features': str(records), 'model.source': str(source), **changes})


@pytest.fixture(scope='module')
def main_records(tmp_path_factory):
  path = tmp_path_factory.mktemp('main_records') / 'animal.jsonl'
  path.write_text(''.join(json.dumps({k: v for k, v in r.items() if k != 'feature_id'},
                                     ensure_ascii=False) + '\n'
                          for r in synthetic_records('animal')[:30]), encoding='utf-8')
  return path


@pytest.fixture(scope='module')
def finished_main(main_records, model_dir, tiny_lm, tmp_path_factory):
  """(config, workdir, result) of a finished main run that stopped early at step 3."""
  workdir = tmp_path_factory.mktemp('main') / 'wd'
  config = main_config(main_records, model_dir)
  result = main.run(config, str(workdir), lm=tiny_lm)
  assert result['steps'] == 3 and result['stopped_early']
  return config, workdir, result


@pytest.fixture(scope='module')
def batch_records(tmp_path_factory):
  """(path, {cause: line number}) of a records file holding every hard case at once: a BOM,
  negative activations, Ġ and ▁ pieces without text, Hebrew and Arabic split per letter, a
  10k-word record, and the four kinds of bad line."""
  animal = synthetic_records('animal')[:16]
  for r in animal[:3]:
    r['activations'] = [-0.5 if a == 0 else a for a in r['activations']]
  rows = [animal, [_marked(r, 'bpe') for r in synthetic_records('number')[:16]],
          [_marked(r, 'sp') for r in synthetic_records('mammal')[:16]],
          [_rtl_record(t, w) for t, w in (HEBREW + ARABIC) * 2]]
  lines = [json.dumps(r, ensure_ascii=False).encode() for group in zip(*rows, strict=True)
           for r in group]
  lines.append(json.dumps({'feature_id': 'long', **long_record()}).encode())
  where = {}
  for i, (cause, line) in enumerate(bad_lines().items()):
    at = 5 + 13 * i
    lines.insert(at, line)
    where[cause] = at + 1
  path = tmp_path_factory.mktemp('batch_records') / 'features.jsonl'
  path.write_bytes(b'\xef\xbb\xbf' + b'\n'.join(lines) + b'\n')
  return path, where


class _Collect(logging.Handler):
  """The messages of the warnings logged while attached."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope='module')
def finished_batch(batch_records, model_dir, tiny_lm, tmp_path_factory):
  """(config, workdir, what the job handed the engine, warnings logged) of a finished batch."""
  workdir = tmp_path_factory.mktemp('batch') / 'wd'
  config = batch_config(batch_records[0], model_dir)
  seen, warnings = {}, _Collect()
  real = batch.label_features

  def spy(config, lm, features, **kwargs):
    labeled = real(config, lm, features, **kwargs)
    seen['features'] = {f.name: f for f in features}
    seen['width'] = labeled.pool.caches.valid.shape[1]
    return labeled

  logger = logging.getLogger('tokenspace_jax')
  logger.addHandler(warnings)
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(batch, 'label_features', spy)
      counts = batch.run(config, str(workdir), lm=tiny_lm)
  finally:
    logger.removeHandler(warnings)
  assert counts['labeled'] == len(BATCH_FEATURES)
  return config, workdir, seen, warnings.messages


def _lines(path):
  return [json.loads(x) for x in path.read_text(encoding='utf-8').splitlines()]


def _one_line(err) -> str:
  message = str(err.value)
  assert '\n' not in message and isinstance(err.value, cli.user_errors())
  return message


@pytest.fixture
def mounts(tmp_path):
  m = Mounts(tmp_path)
  yield m
  m.close()


# --- 1. stale results ------------------------------------------------------------------------


def test_a_records_file_replaced_after_a_finished_run_is_refused(finished_main, tiny_lm):
  config, workdir, _ = finished_main
  records = config.feature.records
  before = open(records, 'rb').read()
  zeros = [{**r, 'activations': [0.0] * len(r['activations'])}
           for r in map(json.loads, before.decode().splitlines())]
  try:
    with open(records, 'w') as f:
      f.write(''.join(json.dumps(r) + '\n' for r in zeros))
    with pytest.raises(InputChangedError) as err:
      main.run(config, str(workdir), lm=tiny_lm)
  finally:
    with open(records, 'wb') as f:
      f.write(before)
  message = _one_line(err)
  assert f'the feature.records file {records} changed (sha256' in message
  assert 'new --workdir' in message


def test_a_model_changed_after_a_finished_run_is_refused(finished_main, model_dir):
  """Without the model's fingerprint checked before the finished result is returned, the old
  label of another model would be shown."""
  config, workdir, _ = finished_main
  path = os.path.join(model_dir, 'config.json')
  before = open(path, 'rb').read()
  try:
    settings = json.loads(before)
    settings['rms_norm_eps'] *= 10
    with open(path, 'w') as f:
      json.dump(settings, f)
    with pytest.raises(InputChangedError) as err:
      main.run(config, str(workdir))  # as the command runs it: the model is not loaded
  finally:
    with open(path, 'wb') as f:
      f.write(before)
  assert f'the model {model_dir} changed (config.json)' in _one_line(err)
  assert main.run(config, str(workdir))['label'] == finished_main[2]['label']


def test_a_batch_records_file_replaced_after_a_finished_job_is_refused(finished_batch, tiny_lm):
  config, workdir, _, _ = finished_batch
  path = config.batch.features
  before = open(path, 'rb').read()
  try:
    with open(path, 'ab') as f:
      f.write(b'{"feature_id": "new", "tokens": ["a"], "activations": [1.0]}\n')
    with pytest.raises(InputChangedError) as err:
      batch.run(config, str(workdir), lm=tiny_lm)
  finally:
    with open(path, 'wb') as f:
      f.write(before)
  assert f'the batch.features file {path} changed' in _one_line(err)


def test_a_kill_after_the_early_stop_resumes_without_another_step(finished_main, tiny_lm,
                                                                  tmp_path):
  """Killed after the early stop's final checkpoint, before result.json: the rerun takes no
  step, so p and the losses are the uninterrupted run's."""
  config, workdir, result = finished_main
  killed = tmp_path / 'killed'
  shutil.copytree(workdir, killed)
  os.remove(killed / 'result.json')
  resumed = main.run(config, str(killed), lm=tiny_lm)
  strip = lambda r: {k: v for k, v in r.items() if k not in TIMINGS}
  assert resumed['steps'] == 3 and strip(resumed) == strip(result)
  assert (killed / 'trajectory.jsonl').read_text().count('\n') == 3


# --- 3. two runs on one workdir, 6. checks before anything is written -----------------------


def test_a_second_run_on_a_held_workdir_refuses_naming_pid_and_host(main_records, batch_records,
                                                                    model_dir, tiny_lm,
                                                                    tmp_path):
  held = tmp_path / 'held'
  with Workdir(str(held)).lock():
    for run, config in ((main.run, main_config(main_records, model_dir)),
                        (batch.run, batch_config(batch_records[0], model_dir))):
      with pytest.raises(WorkdirInUseError) as err:
        run(config, str(held), lm=tiny_lm)
      assert f'in use by PID {os.getpid()} on host {socket.gethostname()}' in _one_line(err)
  assert os.listdir(held) == ['.lock']  # the holder's own; nothing of the refused runs


def test_a_feature_name_out_of_workdirs_creates_nothing(main_records, tmp_path):
  """``feature.name=../../x`` with a records file (so a valid feature) and no --workdir: the
  command refuses in one line before any folder is made."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  proc = subprocess.run(
      [sys.executable, '-m', 'tokenspace_jax.main', f'--config={ROOT}/configs/chinese.py',
       '--config.feature.name=../../x', f'--config.feature.records={main_records}'],
      cwd=cwd, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, timeout=300)
  err = proc.stderr.decode()
  assert proc.returncode == 1, err[-2000:]
  assert err.splitlines()[-1] == (
      "error: feature.name='../../x' is no folder name for the default workdir under "
      'workdirs/; pass --workdir=DIR, or a feature.name without "/".')
  assert 'Traceback' not in err and os.listdir(cwd) == [] and not (tmp_path / 'x').exists()


@pytest.mark.parametrize('key, value, message', [
    ('optim.lr', math.inf, 'optim.lr=inf is not a finite number'),
    ('loss.w_kl', math.nan, 'loss.w_kl=nan is not a finite number'),
    ('label.temperature', 0.0, 'label.temperature=0.0 must be positive'),
    ('contrast.labels', 1, 'contrast.labels=1 must be 0 (no contrast) or at least 2')])
def test_bad_values_are_refused_before_anything_is_written(main_records, batch_records,
                                                           model_dir, tmp_path, key, value,
                                                           message):
  for run, config in ((main.run, main_config(main_records, model_dir, **{key: value})),
                      (batch.run, batch_config(batch_records[0], model_dir, **{key: value}))):
    with pytest.raises(ConfigValueError) as err:
      run(config, str(tmp_path / 'wd'))  # no model given: refused before one is loaded
    assert message in _one_line(err)
    assert not (tmp_path / 'wd').exists()


def test_default_workdir_is_refused_outside_workdirs():
  c = main_config('r.jsonl', 'm')
  for name in ('../../x', '/tmp/x', 'a/b', '..'):
    c.feature.name = name
    with pytest.raises(ConfigValueError, match='--workdir'):
      default_workdir(c)
  c.feature.name = ''
  assert default_workdir(c) == os.path.join('workdirs', 'r')


# --- 5. storage faults -----------------------------------------------------------------------


def test_a_read_only_finished_workdir_shows_its_result(mounts, finished_main, finished_batch,
                                                       tiny_lm):
  disk = mounts.tmpfs('20m')
  shutil.copytree(finished_main[1], disk / 'main')
  shutil.copytree(finished_batch[1], disk / 'batch')
  mounts.read_only(disk)
  assert main.run(finished_main[0], str(disk / 'main'), lm=tiny_lm) == json.loads(
      (finished_main[1] / 'result.json').read_text())
  counts = batch.run(finished_batch[0], str(disk / 'batch'), lm=tiny_lm)
  assert counts['labeled'] == counts['features'] == len(BATCH_FEATURES)


def test_a_read_only_unfinished_batch_is_one_line(mounts, finished_batch, tiny_lm):
  disk = mounts.tmpfs('20m')
  shutil.copytree(finished_batch[1], disk / 'batch')
  lines = (disk / 'batch' / 'labels.jsonl').read_bytes().splitlines(keepends=True)
  (disk / 'batch' / 'labels.jsonl').write_bytes(b''.join(lines[:2]))
  mounts.read_only(disk)
  with pytest.raises(storage.NotWritableError) as err:
    batch.run(finished_batch[0], str(disk / 'batch'), lm=tiny_lm)
  assert 'read-only file system' in _one_line(err)


def test_a_full_disk_during_a_run_is_one_line(mounts, main_records, model_dir,
                                                           tiny_lm):
  disk = mounts.tmpfs('300k')  # the first checkpoint (576 KiB) does not fit
  config = main_config(main_records, model_dir)
  with pytest.raises(storage.DiskFullError) as err:
    main.run(config, str(disk / 'wd'), lm=tiny_lm)
  message = _one_line(err)
  assert message.startswith(f'cannot write {disk}/wd/checkpoints: the disk is full (')
  assert 'needed' in message and 'rerun the same command to resume' in message
  for line in (disk / 'wd' / 'trajectory.jsonl').read_text().splitlines():
    json.loads(line)  # whole lines only


def test_late_tensorstore_callbacks_print_no_traceback(tmp_path, monkeypatch):
  """After Orbax gives up on a damaged step or a full disk it closes its event loop, and the
  reads and writes still in flight report into it: each a traceback on stderr around the
  one-line message. The checkpointer drops exactly those."""
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  monkeypatch.setattr(checkpoint, '_PREVIOUS_HOOK', checkpoint._PREVIOUS_HOOK)
  Checkpointer(str(tmp_path / 'ckpt'), 1).close()

  def unraisable(exc):
    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                 exc_traceback=exc.__traceback__, err_msg=None, object=None)

  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(lambda: None)
  except RuntimeError as e:
    late = e
  sys.unraisablehook(unraisable(late))
  assert seen == []
  try:
    raise RuntimeError('Event loop is closed')  # the same words from elsewhere: reported
  except RuntimeError as e:
    other = unraisable(e)
  sys.unraisablehook(other)
  assert seen == [other]
  assert sys.unraisablehook is checkpoint._drop_late_callbacks


# --- 2. one bad record, 4. memory, 7. text ---------------------------------------------------


def test_bad_lines_of_a_batch_are_skipped_by_line_and_the_rest_labeled(finished_batch,
                                                                      batch_records):
  _, workdir, _, _ = finished_batch
  assert [r['feature_id'] for r in _lines(workdir / 'labels.jsonl')] == BATCH_FEATURES
  skipped = _lines(workdir / 'skipped.jsonl')
  assert [s['line'] for s in skipped] == list(batch_records[1].values())
  for s, (cause, line) in zip(skipped, batch_records[1].items(), strict=True):
    assert f'line {line}: ' in s['error'] and cause in s['error']


@pytest.mark.parametrize('cause', list(bad_lines()))
def test_the_same_bad_lines_in_main_are_one_line(main_records, model_dir, tiny_lm, tmp_path,
                                                 cause):
  path = tmp_path / 'one.jsonl'
  path.write_bytes(bad_lines()[cause] + b'\n' + main_records.read_bytes())
  with pytest.raises(FeatureError) as err:
    main.run(main_config(path, model_dir), str(tmp_path / 'wd'), lm=tiny_lm)
  assert f'{path} line 1: ' in _one_line(err) and cause in str(err.value)


def test_a_10k_word_record_is_cut_into_windows(finished_batch):
  _, _, seen, _ = finished_batch
  long = seen['features']['long']
  windows = {e.window for e in long.train + long.heldout}
  assert len(windows) > 100  # 10k words in windows of 64 tokens
  assert max(len(e.text.split()) for e in long.train + long.heldout) <= 64
  assert seen['width'] < 256  # each cache padded to a window, not to 10k words


def test_an_impossible_pool_is_refused_by_the_memory_estimate(main_records, batch_records,
                                                              model_dir, tiny_lm, tmp_path,
                                                              monkeypatch):
  """With 1 MiB free the caches cannot fit: refused before they are allocated, naming what to
  lower, and only settings the command has (main has no batch section)."""
  monkeypatch.setattr(pool_lib, '_available_bytes', lambda: 1 << 20)
  monkeypatch.delenv('TOKENSPACE_JAX_SKIP_MEMORY_CHECK', raising=False)
  with pytest.raises(pool_lib.PoolMemoryError) as err:
    main.run(main_config(main_records, model_dir), str(tmp_path / 'main'), lm=tiny_lm)
  message = _one_line(err)
  assert 'is free. Lower feature.max_train (16)' in message
  assert 'feature.window (64)' in message and 'batch.' not in message
  with pytest.raises(pool_lib.PoolMemoryError) as err:
    batch.run(batch_config(batch_records[0], model_dir), str(tmp_path / 'batch'), lm=tiny_lm)
  assert 'batch.features_per_step (5)' in _one_line(err)


def test_tokenizer_markers_are_normalised(finished_batch):
  _, _, seen, _ = finished_batch
  for name, marker in (('bpe', '\u0120'), ('sp', '\u2581')):
    examples = seen['features'][name].train + seen['features'][name].heldout
    assert examples and not any(marker in e.text for e in examples)
    assert any(e.target for e in examples)
  texts = {e.text for e in seen['features']['bpe'].train + seen['features']['bpe'].heldout}
  originals = {r['text'] for r in synthetic_records('number')[:16]}
  assert texts <= originals  # the texts the model read, not 'TheĠcat'


def test_hebrew_and_arabic_words_are_not_split_per_letter(finished_batch):
  _, _, seen, _ = finished_batch
  rtl = seen['features']['rtl']
  words = {w for text, _ in HEBREW + ARABIC for w in text.split()}
  assert {e.word for e in rtl.train + rtl.heldout} <= words
  assert {e.word for e in rtl.train + rtl.heldout if e.target} <= {w for _, w in HEBREW + ARABIC}


def test_a_bom_is_accepted_and_negative_activations_warned_once(finished_batch, batch_records):
  _, workdir, seen, warnings = finished_batch
  assert batch_records[0].read_bytes().startswith(b'\xef\xbb\xbf')
  assert not any(s.get('line') == 1 for s in _lines(workdir / 'skipped.jsonl'))
  first = json.loads(batch_records[0].read_bytes()[3:].split(b'\n')[0])
  animal = seen['features']['animal']
  assert first['text'] in {e.text for e in animal.train + animal.heldout}
  negative = [w for w in warnings if 'negative' in w]
  assert len(negative) == 1 and 'activations are negative' in negative[0]


def test_settling_without_a_final_choice_is_off():
  """early_stop.settled (on by default) waits for the final choice's candidates; with no choice
  (choice.top_k=0) there are none, so the rule is off rather than the config refused, and the
  step compares no candidate sets."""
  from tokenspace_jax.engine.run import settle_rule
  c = config_defaults.get_base_config()
  c.feature.name = 'animal'
  config_defaults.validate(c)
  assert c.early_stop.settled == 10 and settle_rule(c) == (c.choice.top_k, 10)
  c.choice.top_k = 0
  config_defaults.validate(c)
  assert settle_rule(c) == (0, 0)
  c.choice.top_k, c.early_stop.settled = 16, 0
  assert settle_rule(c) == (0, 0)
