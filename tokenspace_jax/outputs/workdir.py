"""A workdir's integrity: which run it holds, on which inputs, and who is writing it now.

A workdir is the unit of resumption, so it must refuse what would silently mix two experiments:
a resumption with another config, another records file or another model, and a second run
writing it at the same time. It must also not pin itself to a run that never got going (a run
that failed before its first checkpoint leaves its config behind, and the next config is
welcome), and a finished workdir must stay readable where it cannot be written.

The engine's order of calls::

  wd = Workdir(workdir, write=is_main_process(), resumable=RESUMABLE_CHANGES)
  with wd.lock():                        # refuses a second run; no-op for write=False
    wd.check(settings, inputs)           # read-only: refuses a changed config or input
    if (done := wd.finished('result.json')) is not None:
      return done                        # nothing was written
    ... load the model, validate ...
    wd.commit(settings, inputs)          # the run has started: the workdir is now its
    ... descend, checkpoint, write results ...
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time

from tokenspace_jax.outputs import storage

log = logging.getLogger('tokenspace_jax')

# Config keys (or whole sections) a resumption may change; the engine passes its own list.
RESUMABLE_CHANGES = ('steps', 'checkpoint_every', 'early_stop', 'eval', 'progress')
# Files whose presence means the workdir holds finished work.
RESULT_FILES = ('result.json', 'sweep.json', 'labels.jsonl')
# Folders (globs, relative to the workdir) of Orbax checkpoints.
CHECKPOINT_DIRS = ('checkpoints', 'groups/*/checkpoints')
CONFIG_FILE = 'config.json'
INPUTS_FILE = 'inputs.json'
LOCK_FILE = '.lock'


class WorkdirError(ValueError):
  """The workdir cannot take this run; the message says why and what to do instead."""


class ConfigChangedError(WorkdirError):
  pass


class InputChangedError(WorkdirError):
  pass


class InputFileError(WorkdirError):
  pass


class WorkdirInUseError(WorkdirError):
  pass


class CorruptWorkdirFileError(WorkdirError):
  pass


# --- fingerprints ----------------------------------------------------------------------------

_CHUNK = 1 << 20
_HEAD, _TAIL, _SAMPLES, _SAMPLE = 8 << 20, 4 << 20, 32, 64 << 10
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model',
                    'special_tokens_map.json', 'vocab.json', 'merges.txt', 'added_tokens.json')


def _open_input(path: str):
  try:
    return open(path, 'rb')
  except OSError as e:
    raise InputFileError(f'cannot read {path} ({e.strerror}); check the path (relative paths are '
                         f'resolved from {os.getcwd()}).') from None


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with _open_input(path) as f:
    while block := f.read(_CHUNK):
      h.update(block)
  return h.hexdigest()


def fingerprint_file(path: str) -> dict:
  """Path, size and sha256 of an input file such as an activation-records ``.jsonl``."""
  h = hashlib.sha256()
  size = 0
  with _open_input(path) as f:
    while block := f.read(_CHUNK):
      h.update(block)
      size += len(block)
  return {'kind': 'file', 'path': os.path.abspath(path), 'size': size, 'sha256': h.hexdigest()}


def _sample_sha256(path: str) -> str:
  """sha256 of the size, the first and last MiBs and evenly spaced blocks between them.

  This stands for a full hash of a weights file, which would read every weight on every run.
  What it must catch is another model at the same path (a re-download, a
  re-export, a new quantization or fine-tune), not bit rot: the head holds a GGUF file's whole
  metadata and tensor table (a safetensors header is hashed exactly besides), a different
  model differs in nearly every tensor and so in the tail and the sampled blocks, and the size
  catches most of the rest. A sidecar cache of full hashes was the other choice; it needs a
  writable place beside read-only model stores, goes stale across hosts, and still costs the
  full read on every new workdir. Files small enough are hashed whole.
  """
  h = hashlib.sha256()
  with _open_input(path) as f:
    size = os.fstat(f.fileno()).st_size
    h.update(struct.pack('<Q', size))
    if size <= _HEAD + _TAIL + _SAMPLES * _SAMPLE:
      while block := f.read(_CHUNK):
        h.update(block)
      return h.hexdigest()
    h.update(f.read(_HEAD))
    body = size - _HEAD - _TAIL
    for i in range(_SAMPLES):
      f.seek(_HEAD + (body - _SAMPLE) * i // (_SAMPLES - 1))
      h.update(f.read(_SAMPLE))
    f.seek(size - _TAIL)
    h.update(f.read(_TAIL))
  return h.hexdigest()


def _safetensors_header_sha256(path: str) -> str | None:
  with _open_input(path) as f:
    head = f.read(8)
    if len(head) < 8:
      return None
    (n,) = struct.unpack('<Q', head)
    if n > 100_000_000:
      return None  # not safetensors; the loader says so
    return hashlib.sha256(head + f.read(n)).hexdigest()


def fingerprint_model(source: str, path: str) -> dict:
  """What identifies the model at ``path`` (the resolved ``config.model.source``).

  A ``.gguf`` (or any) file: its size and a sampled hash (see ``_sample_sha256``). An HF folder:
  the sha256 of config.json and of the tokenizer files, and for each ``*.safetensors`` file
  its size, the sha256 of its header (names, dtypes, shapes, offsets) and a sampled hash.
  """
  if os.path.isfile(path):
    return {'kind': 'model file', 'source': source, 'path': os.path.abspath(path),
            'size': os.path.getsize(path), 'sample_sha256': _sample_sha256(path)}
  if not os.path.isdir(path):
    raise InputFileError(f'cannot read the model {path} (no such file or folder); check '
                         'config.model.source.')
  weights = {}
  for file in sorted(glob.glob(os.path.join(glob.escape(path), '*.safetensors'))):
    weights[os.path.basename(file)] = {
        'size': os.path.getsize(file), 'header_sha256': _safetensors_header_sha256(file),
        'sample_sha256': _sample_sha256(file)}
  files = {}
  for name in ('config.json', 'model.safetensors.index.json') + _TOKENIZER_FILES:
    if os.path.isfile(os.path.join(path, name)):
      files[name] = _sha256(os.path.join(path, name))
  return {'kind': 'model folder', 'source': source, 'path': os.path.abspath(path),
          'files': files, 'weights': weights}


def _fingerprint_changes(old: dict, new: dict) -> list[str]:
  """What differs between two fingerprints of one input, ignoring where it lies."""
  if old.get('kind') != new.get('kind'):
    return [f'{old.get("kind")} then, {new.get("kind")} now']
  changes = []
  for key in sorted(set(old) | set(new)):
    if key in ('kind', 'path', 'source') or old.get(key) == new.get(key):
      continue
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):  # per-file parts of a model folder
      changed = [n for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
      changes.append(', '.join(changed))
    elif key == 'sha256' or key.endswith('_sha256'):
      changes.append(f'{key} {_short(b)}, was {_short(a)}')
    else:
      changes.append(f'{key} {b}, was {a}')
  return changes


def _short(digest) -> str:
  return f'{digest[:12]}…' if isinstance(digest, str) else str(digest)


# --- config comparison -----------------------------------------------------------------------

_MISSING = object()


def config_differences(stored: dict, current: dict, resumable=RESUMABLE_CHANGES,
                       defaults: dict | None = None) -> list[tuple[str, object, object]]:
  """(dotted key, stored value, current value) of each key that differs.

  Keys under ``resumable`` are ignored; a key the stored config lacks counts as its value in
  ``defaults`` (it was added to the defaults after the workdir was written, and the run there
  used what the default was).
  """
  out = []

  def skip(key):
    return any(key == r or key.startswith(r + '.') for r in resumable)

  def walk(a, b, d, prefix):
    for k in sorted(set(a if isinstance(a, dict) else ()) | set(b if isinstance(b, dict) else ()),
                    key=str):
      key = f'{prefix}{k}'
      if skip(key):
        continue
      va = a.get(k, _MISSING) if isinstance(a, dict) else _MISSING
      vb = b.get(k, _MISSING) if isinstance(b, dict) else _MISSING
      vd = d.get(k, _MISSING) if isinstance(d, dict) else _MISSING
      if isinstance(vb, dict) and (isinstance(va, dict) or va is _MISSING):
        walk(va if isinstance(va, dict) else {}, vb, vd, key + '.')
        continue
      if va is _MISSING and vb is not _MISSING and vd is not _MISSING and vb == vd:
        continue  # a key added to the defaults since
      if va != vb:
        out.append((key, va, vb))

  walk(stored, current, defaults or {}, '')
  return out


def _shown(value) -> str:
  if value is _MISSING:
    return 'absent'
  text = json.dumps(value, ensure_ascii=False)
  return text if len(text) <= 40 else text[:37] + '...'


def _base_defaults() -> dict:
  try:
    from tokenspace_jax.config_defaults import get_base_config
    return json.loads(get_base_config().to_json())
  except (ImportError, AttributeError):
    return {}


# --- the workdir -----------------------------------------------------------------------------


class Workdir:
  """One run's folder: its config and inputs checked on resumption, and a lock while it runs.

  Args:
    path: the folder (made by ``lock()`` when it does not exist).
    write: False on the processes of a multi-host job that do not write (all but process 0):
      no lock is taken and nothing is written, but the checks still run.
    resumable: config keys or sections a resumption may change.
    defaults: the default config (JSON-like), for keys the stored config lacks; by default
      ``config_defaults.get_base_config()``.
    results: files whose presence means finished work.
    heartbeat, stale_after: seconds between refreshes of the lock file, and the silence after
      which a lock recorded by another host is taken to be left by a dead run (the kernel's lock
      may not reach across hosts on a shared file system).
  """

  def __init__(self, path: str, *, write: bool = True, resumable=RESUMABLE_CHANGES,
               defaults: dict | None = None, results=RESULT_FILES, heartbeat: float = 30.0,
               stale_after: float = 300.0):
    self.root = path
    self.write = write
    self.resumable = tuple(resumable)
    self._defaults = defaults
    self.results = tuple(results)
    self.heartbeat = heartbeat
    self.stale_after = stale_after
    self._pending: tuple[dict, dict] | None = None
    self._new_run = False
    self._announced = False

  def path(self, *names: str) -> str:
    return os.path.join(self.root, *names)

  # --- what the workdir holds

  def _read_json(self, name: str):
    path = self.path(name)
    try:
      with open(path, encoding='utf-8') as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CorruptWorkdirFileError(
          f'{path} is not valid JSON ({e}); move it away if the run there is to be redone, or '
          'use another --workdir.') from None

  def finished(self, name: str):
    """The finished result ``name`` holds (parsed JSON), or None if there is none yet."""
    return self._read_json(name)

  def checkpoint_steps(self) -> list[str]:
    """The Orbax step folders under the workdir (finished saves only, not temporary ones)."""
    steps = []
    for pattern in CHECKPOINT_DIRS:
      for directory in glob.glob(os.path.join(glob.escape(self.root), pattern)):
        with contextlib.suppress(OSError):
          steps += [os.path.join(directory, n) for n in os.listdir(directory) if n.isdigit()]
    return sorted(steps)

  def has_progress(self) -> bool:
    """Whether the workdir holds work a new config would mix with: a result or a checkpoint."""
    for name in self.results:
      with contextlib.suppress(OSError):
        if os.path.getsize(self.path(name)) > 0:
          return True
    return bool(self.checkpoint_steps())

  # --- the checks

  def check(self, config: dict, inputs: dict | None = None):
    """Refuses a run that would mix with the one the workdir holds; writes nothing.

    ``config`` is the run's config as JSON-like data; ``inputs`` maps a name (``'model'``, a
    config key such as ``'feature.records'``) to a ``fingerprint_*`` of what the run reads.
    Both are remembered for ``commit()``.
    """
    inputs = dict(inputs or {})
    self._pending = (config, inputs)
    stored = self._read_json(CONFIG_FILE)
    stored_inputs = self._read_json(INPUTS_FILE) or {}
    self._new_run = stored is None
    if stored is None:
      return
    defaults = self._defaults if self._defaults is not None else _base_defaults()
    diffs = config_differences(stored, config, self.resumable, defaults)
    changed = [(name, _fingerprint_changes(stored_inputs[name], fp))
               for name, fp in sorted(inputs.items()) if name in stored_inputs]
    changed = [(name, c, inputs[name]) for name, c in changed if c]
    if not diffs and not changed:
      return
    if not self.has_progress():
      self._new_run = True
      if not self._announced:
        self._announced = True
        log.info('%s: its earlier run left no checkpoint and no result; it takes this run\'s '
                 'config.', self.root)
      return
    if diffs:
      shown = [f'{k} ({_shown(a)} in the workdir, {_shown(b)} now)' for k, a, b in diffs[:6]]
      more = f' and {len(diffs) - 6} more' if len(diffs) > 6 else ''
      raise ConfigChangedError(
          f'{self.root} holds a run with a different config (differs in: {", ".join(shown)}'
          f'{more}). Resuming would mix two experiments: use a new --workdir, or the same config '
          'to resume.')
    name, what, fp = changed[0]
    if fp.get('kind') == 'file':
      thing = f'the {name} file {fp["path"]}'
    else:
      thing = f'the {name} {fp.get("path", "")}'.rstrip()
    raise InputChangedError(
        f'{self.root} holds a run on other inputs: {thing} changed ({"; ".join(what)}). '
        'Resuming would mix two experiments: use a new --workdir, or restore the '
        f'{"file" if fp.get("kind") == "file" else "model"} to resume.')

  def commit(self, config: dict | None = None, inputs: dict | None = None):
    """Makes the workdir this run's: writes its config and inputs, where they differ.

    Call it once the run has really started (config validated, model loaded), so that a run
    failing before then does not pin the workdir. With ``config`` (and ``inputs``) it checks
    them first, as ``check`` does; without, it writes what the last ``check`` was given. A
    workdir that already holds exactly this is not written to.
    """
    if config is not None:
      self.check(config, inputs)
    elif self._pending is None:
      raise RuntimeError('Workdir.commit() without a config needs a check() first.')
    else:
      self.check(*self._pending)  # again: the workdir may have changed since (under the lock)
    config, inputs = self._pending
    if not self.write:
      return
    with storage.translated(self.root):
      os.makedirs(self.root, exist_ok=True)
    # A resumption adds what it fingerprinted; a new run replaces what an earlier one recorded.
    stored = {} if self._new_run else (self._read_json(INPUTS_FILE) or {})
    if self._read_json(INPUTS_FILE) != {**stored, **inputs}:
      storage.write_json(self.path(INPUTS_FILE), {**stored, **inputs})
    if self._read_json(CONFIG_FILE) != config:
      storage.write_json(self.path(CONFIG_FILE), config)

  # --- the lock

  @contextlib.contextmanager
  def lock(self):
    """Holds the workdir for this process, or refuses in one line if another run holds it.

    ``fcntl.flock`` on ``.lock``: the kernel releases it when the holder dies, however it dies,
    so a dead run's lock is never in the way on its host. The file records the holder's PID,
    host and start time for the refusal message, and its mtime is refreshed every ``heartbeat``
    seconds, because where the file system does not carry flocks between hosts only a fresh
    record from another host can tell that a run there is alive. A workdir that cannot be
    written is not locked (only read: a finished result there can still be shown).
    """
    if not self.write:
      yield self
      return
    fd = self._open_lock()
    if fd is None:
      yield self
      return
    stop = threading.Event()
    beat = None
    try:
      self._acquire(fd)
      beat = threading.Thread(target=self._beat, args=(fd, stop), daemon=True,
                              name='workdir-lock-heartbeat')
      beat.start()
      yield self
    finally:
      stop.set()
      if beat is not None:
        beat.join()
        with contextlib.suppress(OSError):
          os.ftruncate(fd, 0)  # released cleanly: nothing for the next run to weigh
      os.close(fd)  # releases the flock

  def _open_lock(self) -> int | None:
    path = self.path(LOCK_FILE)
    try:
      os.makedirs(self.root, exist_ok=True)
      return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      err = storage.storage_error(e, path)
      if err is None:
        raise
      if e.errno not in storage.NOT_WRITABLE or not os.path.isdir(self.root):
        raise err from e  # a full disk, or no workdir at all to read
    log.info('%s is not writable: it is not locked, only read.', self.root)
    try:  # a read-only descriptor can still be flocked, which still detects a live holder
      fd = os.open(path, os.O_RDONLY)
    except OSError:
      return None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirInUseError(self._in_use(holder)) from None
    os.close(fd)
    return None

  def _acquire(self, fd: int):
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirInUseError(self._in_use(_read_holder(fd))) from None
    holder = _read_holder(fd)
    here = socket.gethostname()
    if holder and holder.get('host') != here:
      silent = time.time() - os.fstat(fd).st_mtime
      if silent < self.stale_after:
        raise WorkdirInUseError(self._in_use(holder, silent))
      log.warning('%s: taking over the lock of PID %s on host %s, silent for %.0f s.', self.root,
                  holder.get('pid'), holder.get('host'), silent)
    elif holder and holder.get('pid') != os.getpid():
      log.info('%s: taking over the lock left by PID %s (%s).', self.root, holder.get('pid'),
               'no longer running' if not _pid_alive(holder.get('pid')) else 'not holding it')
    record = {'pid': os.getpid(), 'host': here,
              'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    data = (json.dumps(record) + '\n').encode()
    with storage.translated(self.path(LOCK_FILE), len(data)):
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
      os.fsync(fd)

  def _beat(self, fd: int, stop: threading.Event):
    while not stop.wait(self.heartbeat):
      with contextlib.suppress(OSError):
        os.utime(fd)

  def _in_use(self, holder: dict | None, silent: float | None = None) -> str:
    if not holder:
      return (f'{self.root} is in use by another run (which has not recorded itself yet); wait '
              'for it to finish or use another --workdir.')
    lapse = ''
    if silent is not None:
      lapse = (f' (last heard from {silent:.0f} s ago; if that run is dead, its lock lapses '
               f'{self.stale_after:.0f} s after that)')
    return (f'{self.root} is in use by PID {holder.get("pid")} on host {holder.get("host")} '
            f'since {holder.get("since")}{lapse}; wait for it to finish or use another '
            '--workdir.')


def _read_holder(fd: int) -> dict | None:
  try:
    data = os.pread(fd, 4096, 0)
    holder = json.loads(data) if data.strip() else None
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _pid_alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except OSError as e:
    return e.errno != errno.ESRCH
  return True
