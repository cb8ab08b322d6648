"""One entry point for every model source users have: an HF folder, a GGUF file, or a named
offline model (``default``, ``qwen2.5-coder-0.5b``, ...: see ``models/offline.py``)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax.numpy as jnp

from tokenspace_jax.models import offline
from tokenspace_jax.models.config import LlamaConfig, UnsupportedConfigError, config_from_hf_dict
from tokenspace_jax.models.llama import Llama
from tokenspace_jax.models.loading.errors import ModelLoadError
from tokenspace_jax.models.loading.gguf_source import GGUFSource
from tokenspace_jax.models.loading.param_mapping import (
  GGUF_IGNORED,
  GGUF_RULES_BY_ARCH,
  HF_IGNORED,
  HF_RULES,
  assemble_params,
)
from tokenspace_jax.models.loading.safetensors_source import SafetensorsSource
from tokenspace_jax.models.tokenizer import load_tokenizer


@dataclasses.dataclass
class LoadedModel:
  model: Llama
  params: dict
  config: LlamaConfig
  tokenizer: Any
  path: str
  load_seconds: float


def resolve_source(source: str) -> str:
  """The file or folder behind ``source``; a clear error if there is none."""
  if offline.is_model_name(source):
    return offline.gguf_path(source)
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise ModelLoadError(
        f'Model source "{source}" does not exist. Pass an HF folder (config.json and '
        f'*.safetensors), a .gguf file, or a named offline model: {", ".join(offline.names())}.')
  return path


def read_config(path: str, *, strict: bool = True) -> LlamaConfig:
  """The LlamaConfig of a GGUF file or an HF folder, without reading any weights."""
  if os.path.isfile(path):
    return GGUFSource(_check_gguf(path)).config()
  return _read_hf_config(path, strict)


def load_model(source: str, *, dtype=jnp.float32, param_dtype=None, shardings=None,
               strict: bool = True, with_tokenizer: bool = True) -> LoadedModel:
  """Loads config, params and tokenizer.

  Args:
    source: an HF folder, a ``.gguf`` file, or a named offline model (``"default"``,
      ``"qwen2.5-coder-0.5b"``, ...; ``offline.names()``).
    dtype: activation dtype of the model.
    param_dtype: dtype the weights are stored in (default: ``dtype``).
    shardings: optional tree of shardings for the params, or a callable ``config -> tree``.
    strict: refuse config attributes this implementation does not know (HF folders).
  """
  start = time.perf_counter()
  path = resolve_source(source)
  param_dtype = param_dtype or dtype
  if os.path.isfile(path):
    src = GGUFSource(_check_gguf(path))
    config = src.config()
    rules, ignored = GGUF_RULES_BY_ARCH[src.architecture], GGUF_IGNORED
  else:
    config = _read_hf_config(path, strict)
    src = SafetensorsSource(path)
    rules, ignored = HF_RULES, HF_IGNORED
  model = Llama(config, dtype=dtype, param_dtype=param_dtype)
  if callable(shardings):
    shardings = shardings(model)
  params = assemble_params(src, rules, ignored, model, shardings)
  tokenizer = load_tokenizer(path) if with_tokenizer else None
  return LoadedModel(model=model, params=params, config=config, tokenizer=tokenizer, path=path,
                     load_seconds=time.perf_counter() - start)


def _check_gguf(path: str) -> str:
  if not path.endswith('.gguf'):
    raise ModelLoadError(f'{path} is a file but not a .gguf file. Pass a .gguf file or an HF '
                         'folder holding config.json and *.safetensors.')
  return path


def _read_hf_config(folder: str, strict: bool) -> LlamaConfig:
  cfg_path = os.path.join(folder, 'config.json')
  if not os.path.isfile(cfg_path):
    raise ModelLoadError(f'{folder} has no config.json: not an HF model folder. Pass a folder '
                         'saved with save_pretrained, or a .gguf file.')
  try:
    with open(cfg_path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ModelLoadError(f'{cfg_path}: not valid JSON ({e}).') from None
  try:
    return config_from_hf_dict(d, strict=strict)
  except UnsupportedConfigError as e:
    raise UnsupportedConfigError(f'{cfg_path}: {e}') from None
