"""Checkpoints verified on restore: a damaged newest step falls back to the older intact one."""

from __future__ import annotations

import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_outputs_storage import Mounts, fill

from tokenspace_jax.outputs import storage
from tokenspace_jax.outputs.checkpoint import Checkpointer

# Orbax leaves the reads of a damaged step's other arrays to be closed by the garbage collector,
# which pytest reports; a plain run prints nothing.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.fixture
def mounts(tmp_path):
  m = Mounts(tmp_path)
  yield m
  m.close()


def state_at(step: int) -> dict:
  return {'label': {'logits': jnp.arange(2048, dtype=jnp.float32) * (step + 1)},
          'opt': (jnp.full((4, 8), step, jnp.bfloat16),), 'step': jnp.asarray(step, jnp.int32)}


def saved(directory, steps=(1, 2)) -> str:
  ckpt = Checkpointer(str(directory), every=1)
  for s in steps:
    assert ckpt.save(s, state_at(s))
  ckpt.close()
  return str(directory)


def restored_step(directory) -> int | None:
  ckpt = Checkpointer(str(directory), every=1)
  state = ckpt.restore(state_at(0))
  ckpt.close()
  if state is None:
    return None
  step = int(state['step'])
  np.testing.assert_array_equal(state['label']['logits'], state_at(step)['label']['logits'])
  return step


def array_files(directory, step: int) -> list[str]:
  """The data files of a step, largest first (the logits are in the largest)."""
  files = glob.glob(os.path.join(str(directory), str(step), '**', 'd', '*'), recursive=True)
  return sorted(files, key=os.path.getsize, reverse=True)


def flip_bytes(path: str):
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 4, len(data) // 4 + 8):
    data[i] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(data)


def test_intact_checkpoints_restore_the_newest(tmp_path):
  assert restored_step(saved(tmp_path / 'c')) == 2


def test_a_truncated_newest_step_falls_back_to_the_older_one(tmp_path, caplog):
  directory = saved(tmp_path / 'c')
  os.truncate(array_files(directory, 2)[0], 10)
  with caplog.at_level(logging.WARNING, logger='tokenspace_jax'):
    assert restored_step(directory) == 1
  assert 'step 2' in caplog.text and 'cannot be read (' in caplog.text
  assert 'TensorStore details' not in caplog.text  # the precise cause, not Orbax's wrapper
  assert os.path.isdir(os.path.join(directory, 'set_aside', '2'))  # kept, out of Orbax's way


def test_a_byte_flip_is_restored_silently_by_orbax_alone(tmp_path):
  """Why checksums are needed: Orbax reads damaged array bytes without complaint."""
  directory = saved(tmp_path / 'c')
  flip_bytes(array_files(directory, 2)[0])
  manager = ocp.CheckpointManager(directory)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_at(0))
  state = manager.restore(2, args=ocp.args.StandardRestore(target))
  manager.close()
  assert int(state['step']) == 2
  assert not np.array_equal(state['label']['logits'], state_at(2)['label']['logits'])


def test_a_byte_flip_is_caught_by_the_checksums(tmp_path, caplog):
  directory = saved(tmp_path / 'c')
  flip_bytes(array_files(directory, 2)[0])
  with caplog.at_level(logging.WARNING, logger='tokenspace_jax'):
    assert restored_step(directory) == 1
  assert "differ from the checksums" in caplog.text and "['label']['logits']" in caplog.text


def test_a_missing_checksum_file_skips_its_step(tmp_path, caplog):
  directory = saved(tmp_path / 'c')
  os.remove(os.path.join(directory, 'checksums', '2.json'))
  with caplog.at_level(logging.WARNING, logger='tokenspace_jax'):
    assert restored_step(directory) == 1
  assert 'checksum file' in caplog.text and 'missing' in caplog.text


def test_checkpoints_from_before_checksums_restore_unverified(tmp_path):
  directory = str(tmp_path / 'c')
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
  manager.save(3, args=ocp.args.StandardSave(state_at(3)))
  manager.close()
  assert restored_step(directory) == 3


def test_no_intact_step_starts_over_and_saves_again(tmp_path, caplog):
  directory = saved(tmp_path / 'c')
  for step in (1, 2):
    os.truncate(array_files(directory, step)[0], 10)
  ckpt = Checkpointer(directory, every=1)
  with caplog.at_level(logging.WARNING, logger='tokenspace_jax'):
    assert ckpt.restore(state_at(0)) is None
  assert 'No intact checkpoint' in caplog.text
  # The damaged steps are out of the way: the run can save steps 1 and 2 again.
  assert ckpt.save(1, state_at(1)) and ckpt.save(2, state_at(2))
  ckpt.close()
  assert restored_step(directory) == 2
  assert sorted(os.listdir(os.path.join(directory, 'set_aside'))) == [
      '1', '1.checksums.json', '2', '2.checksums.json']


def test_a_resumed_run_saves_over_the_skipped_step(tmp_path):
  directory = saved(tmp_path / 'c')
  flip_bytes(array_files(directory, 2)[0])
  ckpt = Checkpointer(directory, every=1)
  assert int(ckpt.restore(state_at(0))['step']) == 1
  assert ckpt.save(2, state_at(2))  # refused by Orbax if the damaged step 2 were still there
  ckpt.close()
  assert restored_step(directory) == 2


def test_checksum_files_follow_orbax_clean_up(tmp_path):
  directory = saved(tmp_path / 'c', steps=(1, 2, 3, 4))
  assert sorted(os.listdir(os.path.join(directory, 'checksums'))) == ['3.json', '4.json']
  sums = json.load(open(os.path.join(directory, 'checksums', '4.json')))
  assert set(sums['leaves']) == {"['label']['logits']", "['opt'][0]", "['step']"}


def test_periodic_saves_skip_between_intervals(tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'c'), every=5)
  assert ckpt.save(0, state_at(0))
  assert not ckpt.save(3, state_at(3))
  assert ckpt.save(5, state_at(5))
  assert not ckpt.save(5, state_at(5), force=True)  # already on disk
  assert ckpt.save(7, state_at(7), force=True)
  ckpt.close()
  assert ckpt.latest_step() == 7
  assert sorted(os.listdir(tmp_path / 'c' / 'checksums')) == ['5.json', '7.json']


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(mounts, caplog):
  disk = mounts.tmpfs('1m')
  directory = str(disk / 'checkpoints')
  ckpt = Checkpointer(directory, every=1)
  ckpt.save(1, state_at(1))
  ckpt._manager.wait_until_finished()
  fill(disk, leave=4096)
  big = {**state_at(2), 'label': {'logits': jnp.ones(1 << 18, jnp.float32)}}
  with caplog.at_level(logging.ERROR), pytest.raises(storage.DiskFullError) as err:
    ckpt.save(2, big)
    ckpt.close()
  message = str(err.value)
  assert '\n' not in message and directory in message and 'about 1.0 MiB needed' in message
  assert 'Traceback' not in caplog.text  # Orbax's own logged tracebacks of it are dropped
  os.remove(disk / 'ballast')
  assert restored_step(directory) == 1


def test_a_read_only_directory_is_one_line_before_orbax_starts(mounts):
  disk = mounts.tmpfs()
  directory = saved(disk / 'checkpoints', steps=(1,))
  mounts.read_only(disk)
  ckpt = Checkpointer(directory, every=1)
  assert int(ckpt.restore(state_at(0))['step']) == 1
  with pytest.raises(storage.NotWritableError, match='read-only file system'):
    ckpt.save(2, state_at(2))
  ckpt.close()


def test_running_out_of_memory_on_restore_sets_nothing_aside(tmp_path, monkeypatch):
  directory = saved(tmp_path / 'c')
  ckpt = Checkpointer(directory, every=1)

  def oom(*args, **kwargs):
    try:
      raise MemoryError('out of device memory')
    except MemoryError as e:
      raise Exception('Encountered error while reading array index') from e  # as Orbax wraps

  monkeypatch.setattr(ckpt._manager, 'restore', oom)
  with pytest.raises(Exception, match='reading array index'):
    ckpt.restore(state_at(0))
  monkeypatch.undo()
  ckpt.close()
  assert not os.path.exists(os.path.join(directory, 'set_aside'))
  assert restored_step(directory) == 2


def test_a_checkpoint_from_before_a_state_key_was_added_resumes(tmp_path):
  """A key added to the state since a checkpoint was written (``optional``) takes its fresh
  value, and the rest is restored as saved; without ``optional`` the step would be skipped."""
  directory = saved(tmp_path / 'ckpt', steps=(3,))
  fresh = {**state_at(0), 'settled': jnp.full(2, 7, jnp.int32)}
  ckpt = Checkpointer(str(directory), every=1)
  state = ckpt.restore(fresh, optional=('settled',))
  ckpt.close()
  assert state is not None and int(state['step']) == 3
  np.testing.assert_array_equal(state['label']['logits'], state_at(3)['label']['logits'])
  np.testing.assert_array_equal(state['settled'], [7, 7])
  strict = Checkpointer(str(directory), every=1)
  assert strict.restore(fresh) is None
  strict.close()
