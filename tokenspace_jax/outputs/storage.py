"""Writing workdir files so that a full disk or a read-only mount is one clear line, not a trace.

A run is stopped by storage faults it cannot fix: a disk that fills up (ENOSPC, EDQUOT) or a
workdir mounted read-only (EROFS, EACCES, EPERM). Every writer of the workdir turns such an
``OSError`` into a :class:`StorageError` whose message names the path, and for a full disk the
free space and roughly what the write needed, so the command line can print it as one line.
Writes are whole or absent: a file is replaced through a temporary file that is fsynced and
renamed (the old content survives a fault), and an appended line is written with one call and
cut back if the call fails, so no half line is ever left in the middle of a file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket

import numpy as np

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)

# Tensorstore (under Orbax) reports file errors as ValueError text, not as OSError.
_CODE_IN_TEXT = re.compile(r"os_error_code='?(\d+)")
_STRERRORS = {os.strerror(code): code for code in DISK_FULL + NOT_WRITABLE}


class StorageError(OSError):
  """A write to the workdir failed for a reason only the user can fix; the message says which."""


class DiskFullError(StorageError):
  pass


class NotWritableError(StorageError):
  pass


def fault_errno(exc: BaseException) -> int | None:
  """The errno of a storage fault anywhere in ``exc``'s chain (also in Tensorstore's text)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    code = getattr(exc, 'errno', None) if isinstance(exc, OSError) else None
    if code in DISK_FULL + NOT_WRITABLE:
      return code
    text = str(exc)
    match = _CODE_IN_TEXT.search(text)
    if match and int(match.group(1)) in DISK_FULL + NOT_WRITABLE:
      return int(match.group(1))
    for message, code in _STRERRORS.items():
      if message in text:
        return code
    exc = exc.__cause__ or exc.__context__
  return None


def human_bytes(n: float) -> str:
  for unit in ('bytes', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n} bytes'  # unreachable


def free_bytes(path: str) -> int | None:
  """Free space on the file system of ``path`` (or of its nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def storage_error(exc: BaseException, path: str, needed: int | None = None) -> StorageError | None:
  """The one-line error for ``exc`` if it is a storage fault at ``path``, else None."""
  code = fault_errno(exc)
  if code is None:
    return None
  if code in DISK_FULL:
    free = free_bytes(path)
    what = 'the disk quota is exceeded' if code == errno.EDQUOT else 'the disk is full'
    space = (f'{human_bytes(free)} free' if free is not None else 'free space unknown')
    if needed:
      space += f', about {human_bytes(needed)} needed'
    err = DiskFullError(f'cannot write {path}: {what} ({space}). Free some space (or move the '
                        'workdir to a bigger disk), then rerun the same command to resume.')
  else:
    err = NotWritableError(f'cannot write {path}: {os.strerror(code).lower()}. Make the '
                           'workdir writable or use another --workdir; a finished result '
                           'there can still be read.')
  err.errno = code
  return err


@contextlib.contextmanager
def translated(path: str, needed: int | None = None):
  """Re-raises a storage fault inside the block as :class:`StorageError`; other errors pass."""
  try:
    yield
  except StorageError:
    raise
  except Exception as e:
    err = storage_error(e, path, needed)
    if err is None:
      raise
    raise err from e


def fsync_dir(directory: str):
  """Makes a rename in ``directory`` durable (best effort: not every file system allows it)."""
  try:
    fd = os.open(directory or '.', os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path: str, data: bytes):
  """Replaces ``path`` with ``data`` durably: the old content stays whole if anything fails."""
  directory = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
  with translated(path, len(data)):
    try:
      with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise
    fsync_dir(directory)


def atomic_write_text(path: str, text: str):
  atomic_write_bytes(path, text.encode('utf-8'))


def jsonable(x):
  """``json.dump``'s fallback for the numpy values results carry."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def write_json(path: str, data, indent: int | None = 2):
  atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=jsonable))


def append_line(fd: int, line: bytes, path: str):
  """Appends one whole line to the O_APPEND descriptor ``fd``, or nothing at all.

  One ``write()`` of the full line; if it fails (or stops short, which a full disk can cause) the
  file is cut back to its length before, so a reader never sees a half line followed by more.
  """
  before = os.fstat(fd).st_size
  try:
    view = memoryview(line)
    while view:
      written = os.write(fd, view)
      view = view[written:]
  except OSError as e:
    with contextlib.suppress(OSError):
      os.ftruncate(fd, before)
    err = storage_error(e, path, len(line))
    if err is None:
      raise
    raise err from e


def open_append(path: str) -> int:
  """An O_APPEND descriptor on ``path``, with a storage fault translated."""
  with translated(path):
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def fsync(fd: int, path: str):
  with translated(path):
    os.fsync(fd)


def check_writable(directory: str):
  """Raises :class:`NotWritableError` unless a file can be created in ``directory``.

  Orbax reports a read-only checkpoint directory from background threads and then waits
  minutes for signals that never come, so the fault is caught here, before it starts.
  """
  probe = os.path.join(directory, f'.write-probe.{socket.gethostname()}.{os.getpid()}')
  with translated(directory):
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
      os.remove(probe)
