"""Tokenizers from transformers, for HF folders and for GGUF files (transformers reads both).

Building a tokenizer from a GGUF file means parsing its whole vocabulary and merge list out of
the metadata and converting them, which takes seconds for every load. So the built tokenizer is
saved (``save_pretrained``) into the cache folder, under a key of the GGUF file's path, size,
mtime and inode and the transformers version, and later loads read that folder instead. A file
that changes, or another transformers release, gets a fresh build.

A cached folder is read with the class its ``tokenizer_config.json`` names, not through
``AutoTokenizer``: importing ``AutoTokenizer`` imports transformers' model configuration code and
with it PyTorch (about 3 s of every command's start), which reading a saved tokenizer does not
need. ``AutoTokenizer`` is imported only where it decides something: an HF folder, a first build.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

import transformers
from transformers import PreTrainedTokenizerBase

from tokenspace_jax.models import cache
from tokenspace_jax.models.loading.errors import ModelLoadError

log = logging.getLogger('tokenspace_jax')
_COMPLETE = 'tokenspace_jax_complete'  # written last: a folder without it is not used


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
  """The tokenizer of an HF folder or a ``.gguf`` file, with the model's chat template."""
  if path.endswith('.gguf'):
    tok = gguf_tokenizer(path)
  else:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok


def cached_tokenizer_dir(gguf_path: str) -> str:
  """Where the tokenizer built from ``gguf_path`` (as the file is now) is cached."""
  key = cache.stamp_key(gguf_path, f'transformers {transformers.__version__}')
  return os.path.join(cache.cache_dir('tokenizers', create=False), key)


def gguf_tokenizer(path: str, *, use_cache: bool = True) -> PreTrainedTokenizerBase:
  """The tokenizer stored in a GGUF file; from the cache folder when it was built before."""
  folder = cached_tokenizer_dir(path)
  if use_cache and os.path.isfile(os.path.join(folder, _COMPLETE)):
    try:
      return _saved_tokenizer(folder)
    except (OSError, ValueError, AttributeError) as e:  # a damaged entry: rebuild it
      log.warning('Cached tokenizer %s is unreadable (%s); rebuilding it.', folder, e)
      shutil.rmtree(folder, ignore_errors=True)
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                      gguf_file=os.path.basename(path))
  if use_cache:
    try:
      _save(tok, folder)
    except (OSError, ModelLoadError) as e:  # a read-only cache costs time, not correctness
      log.warning('Could not cache the tokenizer of %s in %s (%s).', path, folder, e)
  return tok


def _saved_tokenizer(folder: str) -> PreTrainedTokenizerBase:
  """A tokenizer this module saved, read with the class it was saved as."""
  with open(os.path.join(folder, 'tokenizer_config.json')) as f:
    name = json.load(f).get('tokenizer_class')
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f'tokenizer_config.json names no tokenizer class ({name!r})')
  return getattr(transformers, name).from_pretrained(folder)


def _save(tok: PreTrainedTokenizerBase, folder: str) -> None:
  parent = cache.cache_dir('tokenizers')
  tmp = cache.temporary_dir(folder)
  try:
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, _COMPLETE), 'w') as f:
      f.write('')
    try:
      os.rename(tmp, folder)  # atomic; fails if another process cached the same file first
    except OSError:
      if not os.path.isfile(os.path.join(folder, _COMPLETE)):
        raise
    cache.fsync_dir(parent)
  finally:
    with contextlib.suppress(FileNotFoundError):
      shutil.rmtree(tmp)
