"""Storage faults of the workdir writers: a full disk and a read-only mount are one clear line.

Real faults come from a small tmpfs mounted for the test (root ignores chmod, so a read-only
mount is the only honest read-only test); without root or ``mount`` these tests skip.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest

from tokenspace_jax.outputs import report, storage
from tokenspace_jax.outputs.labels_file import LabelsFile


class Mounts:
  """Small tmpfs mounts under a test's tmp_path, unmounted when the test ends."""

  def __init__(self, base):
    self.base = base
    self.mounted = []

  def tmpfs(self, size: str = '256k'):
    if os.geteuid() != 0 or shutil.which('mount') is None:
      pytest.skip('mounting a tmpfs needs root and mount(8)')
    path = self.base / f'tmpfs{len(self.mounted)}'
    path.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, text=True)
    if done.returncode:
      pytest.skip(f'cannot mount a tmpfs here: {done.stderr.strip()}')
    self.mounted.append(path)
    return path

  def read_only(self, path):
    done = subprocess.run(['mount', '-o', 'remount,ro', str(path)], capture_output=True, text=True)
    if done.returncode:
      pytest.skip(f'cannot remount read-only here: {done.stderr.strip()}')

  def close(self):
    for path in reversed(self.mounted):
      subprocess.run(['umount', '-l', str(path)], capture_output=True)


@pytest.fixture
def mounts(tmp_path):
  m = Mounts(tmp_path)
  yield m
  m.close()


def fill(directory, leave: int = 0):
  """Fills the file system of ``directory`` up to ``leave`` bytes free."""
  with open(os.path.join(directory, 'ballast'), 'wb') as f:
    try:
      while True:
        free = shutil.disk_usage(directory).free
        if free <= leave:
          break
        f.write(b'\0' * min(free - leave, 1 << 16))
        f.flush()
    except OSError as e:
      assert e.errno == errno.ENOSPC


# --- no file system needed -------------------------------------------------------------------


def test_fault_errno_reads_oserrors_and_tensorstore_text():
  assert storage.fault_errno(OSError(errno.ENOSPC, 'x')) == errno.ENOSPC
  text = ValueError("Failed to write 10 bytes to file 11: No space left on device "
                    "[os_error_code='28']")
  assert storage.fault_errno(text) == errno.ENOSPC
  try:
    try:
      raise OSError(errno.EROFS, 'Read-only file system')
    except OSError as e:
      raise RuntimeError('wrapped') from e
  except RuntimeError as e:
    assert storage.fault_errno(e) == errno.EROFS
  assert storage.fault_errno(ValueError('shape mismatch')) is None
  assert storage.fault_errno(FileNotFoundError(errno.ENOENT, 'gone')) is None


def test_storage_error_is_one_line_naming_path_and_space(tmp_path):
  err = storage.storage_error(OSError(errno.ENOSPC, 'No space left on device'),
                              str(tmp_path / 'x.json'), needed=3 << 20)
  assert isinstance(err, storage.DiskFullError) and isinstance(err, OSError)
  text = str(err)
  assert '\n' not in text and str(tmp_path / 'x.json') in text
  assert 'free' in text and 'about 3.0 MiB needed' in text
  err = storage.storage_error(OSError(errno.EROFS, 'Read-only file system'), '/w/result.json')
  assert isinstance(err, storage.NotWritableError)
  assert str(err).startswith('cannot write /w/result.json: read-only file system.')


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
  path = tmp_path / 'result.json'
  storage.write_json(str(path), {'a': 1})
  assert json.loads(path.read_text()) == {'a': 1}

  def full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(storage.DiskFullError, match='result.json'):
    storage.write_json(str(path), {'a': 2})
  assert json.loads(path.read_text()) == {'a': 1}
  assert os.listdir(tmp_path) == ['result.json']  # no temporary file left behind


def test_append_line_cuts_back_a_short_write(tmp_path, monkeypatch):
  path = str(tmp_path / 'lines.jsonl')
  fd = storage.open_append(path)
  storage.append_line(fd, b'{"a": 1}\n', path)
  real_write = os.write
  calls = []

  def short_then_full(fd, data):
    calls.append(len(data))
    if len(calls) == 1:
      return real_write(fd, bytes(data[:3]))  # a full disk can stop a write part way
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'write', short_then_full)
  with pytest.raises(storage.DiskFullError):
    storage.append_line(fd, b'{"b": 2}\n', path)
  monkeypatch.undo()
  os.close(fd)
  with open(path, 'rb') as f:
    assert f.read() == b'{"a": 1}\n'


def test_trajectory_drops_a_cut_line_and_the_steps_after_the_checkpoint(tmp_path):
  path = tmp_path / 'trajectory.jsonl'
  path.write_text(''.join(json.dumps({'step': s}) + '\n' for s in (1, 2, 3)) + '{"step": 4, "lo')
  t = report.Trajectory(str(path), resume_step=4)
  assert [r['step'] for r in t.records] == [1, 2, 3]
  t.append({'step': 4})
  t.close()
  assert [json.loads(x)['step'] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
  t = report.Trajectory(str(path), resume_step=2)
  t.close()
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_trajectory_without_write_leaves_the_file_alone(tmp_path):
  path = tmp_path / 'trajectory.jsonl'
  text = '{"step": 1}\n{"step": 2}\n{"st'
  path.write_text(text)
  t = report.Trajectory(str(path), resume_step=1, write=False)
  t.append({'step': 2})
  t.close()
  assert path.read_text() == text and [r['step'] for r in t.records] == [1, 2]


# --- a real full disk ------------------------------------------------------------------------


def test_trajectory_on_a_full_disk_is_one_line_and_stays_whole(mounts):
  disk = mounts.tmpfs()
  path = disk / 'trajectory.jsonl'
  t = report.Trajectory(str(path), resume_step=0)
  record = {'step': 0, 'top': [['x' * 200, 0.5]] * 8}
  with pytest.raises(storage.DiskFullError) as err:
    for step in range(1, 100_000):
      t.append({**record, 'step': step})
  t.close()
  message = str(err.value)
  assert '\n' not in message and str(path) in message and 'free' in message
  assert 'needed' in message
  data = path.read_bytes()
  assert data.endswith(b'\n')  # the failed line was cut back: no half line
  steps = [json.loads(x)['step'] for x in data.splitlines()]
  assert steps == list(range(1, len(steps) + 1))
  assert [r['step'] for r in t.records] == steps  # the failed record is not kept either
  # Resuming on the still-full disk works: cutting back to the checkpoint needs no space.
  t = report.Trajectory(str(path), resume_step=len(steps) - 1)
  assert len(t.records) == len(steps) - 1
  t.close()


def test_labels_file_on_a_full_disk_is_one_line_and_stays_whole(mounts):
  disk = mounts.tmpfs()
  path = disk / 'labels.jsonl'
  labels = LabelsFile(str(path))
  with pytest.raises(storage.DiskFullError, match='labels.jsonl'):
    for fid in range(100_000):
      labels.append({'feature_id': fid, 'label': 'y' * 500})
  labels.close()
  again = LabelsFile(str(path))
  assert again.lines == labels.lines > 0
  assert path.read_bytes().endswith(b'\n')
  again.close()


def test_write_json_on_a_full_disk_keeps_the_old_file(mounts):
  disk = mounts.tmpfs()
  path = disk / 'result.json'
  report.write_json(str(path), {'label': 'old'})
  fill(disk)
  with pytest.raises(storage.DiskFullError, match='result.json.*disk is full'):
    report.write_json(str(path), {'label': 'new' * 10_000})
  assert json.loads(path.read_text()) == {'label': 'old'}
  assert sorted(os.listdir(disk)) == ['ballast', 'result.json']


# --- a read-only mount -----------------------------------------------------------------------


def test_writers_on_a_read_only_workdir_are_one_line(mounts):
  disk = mounts.tmpfs()
  (disk / 'trajectory.jsonl').write_text('{"step": 1}\n')
  (disk / 'labels.jsonl').write_text('{"feature_id": 1}\n')
  mounts.read_only(disk)
  for make in (lambda: report.Trajectory(str(disk / 'trajectory.jsonl'), 1),
               lambda: LabelsFile(str(disk / 'labels.jsonl')).append({'feature_id': 2}),
               lambda: report.write_json(str(disk / 'result.json'), {'a': 1}),
               lambda: storage.check_writable(str(disk))):
    with pytest.raises(storage.NotWritableError, match='read-only file system') as err:
      make()
    assert '\n' not in str(err.value) and str(disk) in str(err.value)
  # Reading is still fine.
  t = report.Trajectory(str(disk / 'trajectory.jsonl'), 1, write=False)
  assert t.records == [{'step': 1}]
  assert 1 in LabelsFile(str(disk / 'labels.jsonl'))  # a finished file opens for reading
