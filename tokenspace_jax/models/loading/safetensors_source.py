"""Tensors from ``*.safetensors`` files, read lazily through a memory map.

The format is parsed here rather than through ``safetensors.numpy`` because that path cannot
return bfloat16 (the dtype of most Llama checkpoints), and because parsing the header ourselves
lets a truncated download be reported as such before any tensor is touched. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from tokenspace_jax.models.loading.errors import WeightFormatError

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'U16': np.uint16, 'U32': np.uint32, 'BOOL': np.bool_,
}


class SafetensorsFile:
  """One safetensors file: its header validated against the file size at open."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
      head = f.read(8)
      if len(head) < 8:
        raise WeightFormatError(f'{path}: not a safetensors file (shorter than its 8-byte header '
                                'length). Re-download or re-export it.')
      (n,) = struct.unpack('<Q', head)
      if n > size - 8 or n > 100_000_000:
        raise WeightFormatError(f'{path}: header length {n} exceeds the file size {size}; the '
                                'file is truncated or not safetensors. Re-download it.')
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFormatError(f'{path}: malformed safetensors header ({e}).') from None
    header.pop('__metadata__', None)
    self._data_start = 8 + n
    self._entries = {}
    for name, info in header.items():
      try:
        dtype = _DTYPES[info['dtype']]
        shape = tuple(int(s) for s in info['shape'])
        begin, end = (int(o) for o in info['data_offsets'])
      except (KeyError, TypeError, ValueError):
        raise WeightFormatError(f'{path}: tensor "{name}" has a malformed or unsupported header '
                                f'entry {info}.') from None
      if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise WeightFormatError(f'{path}: tensor "{name}" has {end - begin} bytes for shape '
                                f'{shape} {info["dtype"]}; the file is corrupt.')
      if self._data_start + end > size:
        raise WeightFormatError(
            f'{path}: tensor "{name}" ends at byte {self._data_start + end} but the file has '
            f'{size} bytes: the file is truncated. Re-download it.')
      self._entries[name] = (dtype, shape, begin)
    self._map = np.memmap(path, dtype=np.uint8, mode='r') if size > self._data_start else None

  def names(self):
    return self._entries.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def get(self, name: str) -> np.ndarray:
    dtype, shape, begin = self._entries[name]
    count = int(np.prod(shape))
    offset = self._data_start + begin
    raw = self._map[offset:offset + count * np.dtype(dtype).itemsize]
    return raw.view(dtype).reshape(shape)


class SafetensorsSource:
  """All tensors of an HF folder: one file, or shards listed in ``model.safetensors.index.json``."""

  def __init__(self, folder: str):
    index_path = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)['weight_map']
      except (json.JSONDecodeError, KeyError) as e:
        raise WeightFormatError(f'{index_path}: malformed shard index ({e}).') from None
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(folder) if f.endswith('.safetensors'))
    if not files:
      raise WeightFormatError(
          f'{folder}: no *.safetensors files. Only safetensors weights are read (never pickled '
          '*.bin files); convert with transformers: model.save_pretrained(dir, '
          'safe_serialization=True).')
    self._owner = {}
    for fname in files:
      path = os.path.join(folder, fname)
      if not os.path.exists(path):
        raise WeightFormatError(f'{path}: listed in the shard index but missing. Re-download it.')
      shard = SafetensorsFile(path)
      for name in shard.names():
        self._owner[name] = shard

  def names(self):
    return self._owner.keys()

  def describe(self, name: str) -> str:
    return self._owner[name].path

  def get(self, name: str) -> np.ndarray:
    return self._owner[name].get(name)
