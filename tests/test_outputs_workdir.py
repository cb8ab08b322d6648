"""Workdir integrity: a changed config or input is refused, a second run is locked out."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from test_outputs_storage import Mounts

from tokenspace_jax.outputs import storage, workdir
from tokenspace_jax.outputs.workdir import (
  ConfigChangedError,
  InputChangedError,
  InputFileError,
  Workdir,
  WorkdirError,
  WorkdirInUseError,
  config_differences,
  fingerprint_file,
  fingerprint_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {'seed': 0, 'steps': 300, 'optim': {'lr': 0.1, 'name': 'adam'},
            'early_stop': {'prob': 0.9}, 'loss': {'answer': 'full', 'w_kl': 0.0}}


@pytest.fixture
def mounts(tmp_path):
  m = Mounts(tmp_path)
  yield m
  m.close()


def config(**changes) -> dict:
  c = json.loads(json.dumps(DEFAULTS))
  for key, value in changes.items():
    *parents, last = key.split('__')
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def wd_at(path, **kwargs) -> Workdir:
  return Workdir(str(path), defaults=DEFAULTS, **kwargs)


def started(path, cfg=None, inputs=None, checkpoint=True) -> Workdir:
  """A workdir that a run committed to, with a checkpoint step (progress) unless told not."""
  wd = wd_at(path)
  with wd.lock():
    wd.check(cfg or config(), inputs)
    wd.commit()
  if checkpoint:
    os.makedirs(os.path.join(str(path), 'checkpoints', '10'))
  return wd


# --- config ----------------------------------------------------------------------------------


def test_config_differences_name_dotted_keys_and_skip_resumable_ones():
  diffs = config_differences(config(), config(optim__lr=0.3, steps=10, seed=1),
                             resumable=('steps',))
  assert diffs == [('optim.lr', 0.1, 0.3), ('seed', 0, 1)]
  assert config_differences(config(), config(early_stop__prob=0.5), resumable=('early_stop',)) == []


def test_keys_added_to_the_defaults_since_count_as_their_default():
  old = config()
  del old['loss']['answer'], old['seed']
  assert config_differences(old, config(), defaults=DEFAULTS) == []
  assert [d[0] for d in config_differences(old, config(loss__answer='binary'),
                                           defaults=DEFAULTS)] == ['loss.answer']
  assert [d[0] for d in config_differences(old, config())] == ['loss.answer', 'seed']


def test_a_changed_config_is_refused_in_one_line_naming_the_keys(tmp_path):
  started(tmp_path)
  with pytest.raises(ConfigChangedError) as err:
    wd_at(tmp_path).check(config(optim__lr=0.3))
  message = str(err.value)
  assert '\n' not in message and str(tmp_path) in message
  assert 'optim.lr (0.1 in the workdir, 0.3 now)' in message and 'new --workdir' in message


def test_resumable_keys_may_change_and_are_recorded(tmp_path):
  started(tmp_path)
  wd = wd_at(tmp_path, resumable=('steps', 'early_stop'))
  wd.check(config(steps=600, early_stop__prob=0.5))
  wd.commit()
  assert json.loads((tmp_path / 'config.json').read_text())['steps'] == 600


def test_a_workdir_without_checkpoint_or_result_takes_a_new_config(tmp_path):
  started(tmp_path, checkpoint=False)  # the earlier run failed before its first checkpoint
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'checkpoints' / '5.orbax-checkpoint-tmp-123').mkdir()  # an unfinished save
  wd = wd_at(tmp_path)
  wd.check(config(optim__lr=0.3))
  wd.commit()
  assert json.loads((tmp_path / 'config.json').read_text())['optim']['lr'] == 0.3


@pytest.mark.parametrize('progress', ['result.json', 'labels.jsonl', 'groups/00003/checkpoints/7'])
def test_results_and_group_checkpoints_pin_the_config(tmp_path, progress):
  started(tmp_path, checkpoint=False)
  path = tmp_path / progress
  path.parent.mkdir(parents=True, exist_ok=True)
  if progress.endswith('7'):
    path.mkdir()
  else:
    path.write_text('{}\n')
  with pytest.raises(ConfigChangedError):
    wd_at(tmp_path).check(config(seed=3))


def test_check_writes_nothing_and_commit_only_what_differs(tmp_path):
  wd = wd_at(tmp_path)
  wd.check(config())
  assert not tmp_path.joinpath('config.json').exists()  # not before the run has started
  wd.commit()
  stamp = lambda: {n: os.stat(tmp_path / n).st_ino for n in ('config.json', 'inputs.json')}
  before = stamp()
  again = wd_at(tmp_path)
  again.check(config())
  again.commit()
  assert stamp() == before  # a rewrite would be a new file (written aside, then renamed)


def test_commit_rechecks_what_changed_since(tmp_path):
  wd = wd_at(tmp_path)
  wd.check(config())
  started(tmp_path, config(seed=5))  # another run got there first
  with pytest.raises(ConfigChangedError):
    wd.commit()


def test_write_false_checks_but_never_writes(tmp_path):
  started(tmp_path)
  wd = wd_at(tmp_path, write=False, resumable=('steps',))
  with wd.lock():
    wd.check(config(steps=5))
    wd.commit()
  assert json.loads((tmp_path / 'config.json').read_text())['steps'] == 300
  assert not (tmp_path / '.lock').read_bytes()
  with pytest.raises(ConfigChangedError):
    wd.check(config(seed=1))


def test_a_corrupt_config_file_is_one_line(tmp_path):
  started(tmp_path)
  (tmp_path / 'config.json').write_text('{"seed": ')
  with pytest.raises(WorkdirError, match='config.json is not valid JSON'):
    wd_at(tmp_path).check(config())


def test_a_finished_read_only_workdir_is_shown_without_writing(mounts):
  disk = mounts.tmpfs()
  wd = started(disk)
  (disk / 'result.json').write_text('{"label": "cat"}')
  mounts.read_only(disk)
  wd = wd_at(disk, resumable=('steps',))
  with wd.lock():
    wd.check(config(steps=10))
    assert wd.finished('result.json') == {'label': 'cat'}
  with wd.lock(), pytest.raises(storage.NotWritableError, match='read-only'):
    wd.commit(config(steps=10))  # only a run that goes on needs to write


# --- inputs ----------------------------------------------------------------------------------


def test_fingerprint_file_hashes_the_content(tmp_path):
  path = tmp_path / 'records.jsonl'
  path.write_text('{"tokens": ["a"]}\n')
  fp = fingerprint_file(str(path))
  assert fp['size'] == path.stat().st_size and len(fp['sha256']) == 64
  path.write_text('{"tokens": ["b"]}\n')
  assert fingerprint_file(str(path))['sha256'] != fp['sha256']
  with pytest.raises(InputFileError, match='missing.jsonl'):
    fingerprint_file(str(tmp_path / 'missing.jsonl'))


def test_a_changed_records_file_is_refused(tmp_path):
  records = tmp_path / 'records.jsonl'
  records.write_text('{"a": 1}\n')
  work = tmp_path / 'w'
  started(work, inputs={'feature.records': fingerprint_file(str(records))})
  records.write_text('{"a": 2}\n')
  with pytest.raises(InputChangedError) as err:
    wd_at(work).check(config(), {'feature.records': fingerprint_file(str(records))})
  message = str(err.value)
  assert '\n' not in message
  assert f'the feature.records file {records} changed (sha256 ' in message
  assert 'new --workdir' in message


def test_a_moved_but_equal_input_is_the_same_input(tmp_path):
  (tmp_path / 'a.jsonl').write_text('{"a": 1}\n')
  (tmp_path / 'b.jsonl').write_text('{"a": 1}\n')
  work = tmp_path / 'w'
  started(work, inputs={'feature.records': fingerprint_file(str(tmp_path / 'a.jsonl'))})
  wd_at(work).check(config(), {'feature.records': fingerprint_file(str(tmp_path / 'b.jsonl'))})


def test_inputs_are_recorded_on_commit_and_merged_on_resume(tmp_path):
  (tmp_path / 'r.jsonl').write_text('x\n')
  work = tmp_path / 'w'
  started(work, inputs={'feature.records': fingerprint_file(str(tmp_path / 'r.jsonl'))})
  model = tmp_path / 'm.gguf'
  model.write_bytes(b'GGUF' + bytes(100))
  wd = wd_at(work)
  wd.commit(config(), {'model': fingerprint_model('m', str(model))})
  assert set(json.loads((work / 'inputs.json').read_text())) == {'feature.records', 'model'}


def _big_file(path, size):
  with open(path, 'wb') as f:
    f.write(b'GGUF')
    f.truncate(size)


def test_a_model_file_change_in_head_tail_or_body_is_seen_cheaply(tmp_path):
  path = str(tmp_path / 'model.gguf')
  _big_file(path, 64 << 20)  # sparse: the hash reads a part of it only
  fp = fingerprint_model('default', path)
  assert fp['kind'] == 'model file' and fp['size'] == 64 << 20
  body = (64 << 20) - workdir._HEAD - workdir._TAIL
  sampled = workdir._HEAD + (body - workdir._SAMPLE) * 15 // (workdir._SAMPLES - 1) + 10
  for offset in (1000, (64 << 20) - 1000, sampled):  # a fine-tune changes every sample
    with open(path, 'r+b') as f:
      f.seek(offset)
      old = f.read(1)
      f.seek(offset)
      f.write(bytes([old[0] ^ 1]))
    assert fingerprint_model('default', path)['sample_sha256'] != fp['sample_sha256'], offset
    with open(path, 'r+b') as f:
      f.seek(offset)
      f.write(old)
  assert fingerprint_model('default', path) == fp


def _safetensors(path, payload: bytes, names=('w',)):
  header = json.dumps({n: {'dtype': 'U8', 'shape': [len(payload)],
                           'data_offsets': [0, len(payload)]} for n in names}).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(header)) + header + payload)


def test_a_changed_hf_folder_names_the_changed_files(tmp_path):
  folder = tmp_path / 'hf'
  folder.mkdir()
  (folder / 'config.json').write_text('{"hidden_size": 64}')
  (folder / 'tokenizer.json').write_text('{}')
  _safetensors(folder / 'model.safetensors', bytes(1000))
  fp = fingerprint_model(str(folder), str(folder))
  assert set(fp['files']) == {'config.json', 'tokenizer.json'}
  assert set(fp['weights']['model.safetensors']) == {'size', 'header_sha256', 'sample_sha256'}
  work = tmp_path / 'w'
  started(work, inputs={'model': fp})
  (folder / 'config.json').write_text('{"hidden_size": 65}')
  _safetensors(folder / 'model.safetensors', bytes(1000), names=('v',))
  with pytest.raises(InputChangedError) as err:
    wd_at(work).check(config(), {'model': fingerprint_model(str(folder), str(folder))})
  message = str(err.value)
  assert f'the model {folder} changed (config.json; model.safetensors)' in message
  assert 'restore the model' in message


def test_a_changed_input_in_a_workdir_without_progress_is_a_new_run(tmp_path):
  (tmp_path / 'r.jsonl').write_text('x\n')
  work = tmp_path / 'w'
  started(work, inputs={'feature.records': fingerprint_file(str(tmp_path / 'r.jsonl'))},
          checkpoint=False)
  (tmp_path / 'r.jsonl').write_text('y\n')
  wd = wd_at(work)
  wd.commit(config(), {'feature.records': fingerprint_file(str(tmp_path / 'r.jsonl'))})
  stored = json.loads((work / 'inputs.json').read_text())['feature.records']
  assert stored == fingerprint_file(str(tmp_path / 'r.jsonl'))


# --- the lock --------------------------------------------------------------------------------


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
  first = wd_at(tmp_path)
  with first.lock():
    holder = json.loads((tmp_path / '.lock').read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(WorkdirInUseError) as err, wd_at(tmp_path).lock():
      pass
    message = str(err.value)
    assert '\n' not in message
    assert (f'{tmp_path} is in use by PID {os.getpid()} on host {socket.gethostname()} since '
            f'{holder["since"]}; wait for it to finish or use another --workdir.') == message
  with wd_at(tmp_path).lock():  # released
    pass
  assert (tmp_path / '.lock').read_bytes() == b''


HOLD = '''
import sys, time
sys.path.insert(0, {root!r})
from tokenspace_jax.outputs.workdir import Workdir
with Workdir({path!r}, defaults={{}}).lock():
  print('locked', flush=True)
  time.sleep(60)
'''


def test_a_lock_held_by_another_process_is_refused_and_freed_when_it_dies(tmp_path):
  proc = subprocess.Popen([sys.executable, '-c', HOLD.format(root=ROOT, path=str(tmp_path))],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'locked'
    with pytest.raises(WorkdirInUseError, match=f'in use by PID {proc.pid} on host '):
      with wd_at(tmp_path).lock():
        pass
  finally:
    proc.kill()  # a SIGKILL: the lock file still names it, but the kernel dropped its flock
    proc.wait()
  assert json.loads((tmp_path / '.lock').read_text())['pid'] == proc.pid
  with wd_at(tmp_path).lock():
    assert json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid()


def test_a_record_of_another_host_blocks_until_it_goes_stale(tmp_path):
  record = {'pid': 99, 'host': 'elsewhere', 'since': '2025-01-01T00:00:00+00:00'}
  (tmp_path / '.lock').write_text(json.dumps(record))
  with pytest.raises(WorkdirInUseError) as err, wd_at(tmp_path).lock():
    pass
  assert 'in use by PID 99 on host elsewhere' in str(err.value)
  assert 'its lock lapses 300 s after that' in str(err.value)
  old = time.time() - 301
  os.utime(tmp_path / '.lock', (old, old))
  with wd_at(tmp_path).lock():
    assert json.loads((tmp_path / '.lock').read_text())['host'] == socket.gethostname()


def test_the_holder_refreshes_its_lock_file(tmp_path):
  old = time.time() - 1000
  with wd_at(tmp_path, heartbeat=0.05).lock():
    os.utime(tmp_path / '.lock', (old, old))
    deadline = time.time() + 10
    while time.time() - os.stat(tmp_path / '.lock').st_mtime > 100 and time.time() < deadline:
      time.sleep(0.02)
    assert time.time() - os.stat(tmp_path / '.lock').st_mtime < 100


def test_write_false_takes_no_lock(tmp_path):
  with wd_at(tmp_path).lock(), wd_at(tmp_path, write=False).lock():
    pass


def test_a_read_only_workdir_is_not_locked_but_a_live_holder_is_still_seen(mounts):
  disk = mounts.tmpfs()
  (disk / 'result.json').write_text('{}')
  (disk / '.lock').write_text('')
  mounts.read_only(disk)
  with wd_at(disk).lock() as wd:
    assert wd.finished('result.json') == {}
  with open(disk / '.lock') as f:  # a read-only descriptor can hold a flock too
    fcntl.flock(f, fcntl.LOCK_EX)
    with pytest.raises(WorkdirInUseError, match='in use by another run'), wd_at(disk).lock():
      pass


def test_a_missing_workdir_on_a_read_only_mount_is_one_line(mounts):
  disk = mounts.tmpfs()
  mounts.read_only(disk)
  with pytest.raises(storage.NotWritableError, match='read-only'), wd_at(disk / 'new').lock():
    pass


def test_default_resumable_keys_are_todays():
  assert workdir.RESUMABLE_CHANGES == ('steps', 'checkpoint_every', 'early_stop', 'eval',
                                       'progress')
