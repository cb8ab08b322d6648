"""The cache folder for what is slow to rebuild: assembled model files and built tokenizers.

``$TOKENSPACE_JAX_CACHE``, else ``$XDG_CACHE_HOME/tokenspace_jax``, else
``~/.cache/tokenspace_jax``. Everything in it can be deleted at any time and is rebuilt on the next
load. Writes are atomic (a temporary name in the same folder, fsync, rename), so a crash or a
concurrent process never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile

from tokenspace_jax.models.loading.errors import ModelLoadError

CACHE_ENV = 'TOKENSPACE_JAX_CACHE'


def cache_dir(*parts: str, create: bool = True) -> str:
  """The cache folder (or a subfolder of it), created unless ``create=False``."""
  root = os.environ.get(CACHE_ENV) or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'tokenspace_jax')
  folder = os.path.join(root, *parts)
  if create:
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError as e:
      raise ModelLoadError(f'Cannot create the cache folder {folder} ({e}); set {CACHE_ENV} to '
                           'a writable folder.') from None
  return folder


def file_stamp(path: str) -> dict:
  """What changes when a file is rewritten or replaced: size, modification time and inode."""
  st = os.stat(path)
  return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'inode': st.st_ino}


def stamp_key(path: str, *extra: str) -> str:
  """A short folder name for the file as it is now (and ``extra``, e.g. a library version)."""
  text = json.dumps([os.path.abspath(path), file_stamp(path), *extra])
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def fsync_dir(folder: str) -> None:
  """Makes a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
  with contextlib.suppress(OSError):
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def temporary_path(final: str, suffix: str = '.partial') -> str:
  """A new empty file beside ``final``, hidden, for writing before the rename to ``final``.

  Readable as a file created with ``open`` would be (mkstemp makes it owner-only), so a cache
  folder shared by a team stays usable by all of it.
  """
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final),
                             prefix=f'.{os.path.basename(final)}.', suffix=suffix)
  os.close(fd)
  os.chmod(tmp, 0o666 & ~_umask())
  return tmp


def temporary_dir(final: str) -> str:
  """``temporary_path`` for a folder (mkdtemp makes it owner-only)."""
  tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=f'.{os.path.basename(final)}.')
  os.chmod(tmp, 0o777 & ~_umask())
  return tmp


def write_json_atomically(path: str, data) -> None:
  tmp = temporary_path(path, '.tmp')
  try:
    with open(tmp, 'w') as f:
      json.dump(data, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  fsync_dir(os.path.dirname(path))


def read_json(path: str):
  """The JSON in ``path``, or None if it is absent or unreadable (a cache entry to rebuild)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
