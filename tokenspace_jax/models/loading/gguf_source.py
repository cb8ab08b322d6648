"""Tensors and config from a llama.cpp GGUF file, dequantized one tensor at a time.

``gguf`` memory-maps the file, so a tensor is read and dequantized only when asked for; host
memory holds at most one float32 tensor beyond the target tree. llama.cpp's converter permutes
the rows of the Q and K projections of a ``llama`` (interleaved RoPE pairs) but not of a ``qwen2``;
the un-permute hook lives in the name map, not here.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from tokenspace_jax.models.config import LlamaConfig, UnsupportedConfigError
from tokenspace_jax.models.loading.errors import WeightFormatError

# general.architecture -> whether its Q/K/V projections carry biases (tensors attn_{q,k,v}.bias).
ARCHITECTURES = {'llama': False, 'qwen2': True}


@functools.cache
def _reader_class():
  import gguf

  class PlainArrayReader(gguf.GGUFReader):
    """``GGUFReader`` over a plain ndarray view of its memory map.

    The reader slices its map once per metadata item (hundreds of thousands for a vocabulary),
    and every slice of an ``np.memmap`` runs the subclass's Python ``__array_finalize__``; a
    plain view of the same memory makes parsing, and dequantizing the tensor views it hands
    out, several times faster. Nothing is copied: the view keeps the map alive.
    """

    @property
    def data(self):
      return self._plain

    @data.setter
    def data(self, mapped):
      self._plain = mapped.view(np.ndarray)

  return PlainArrayReader


def _open_reader(path: str):
  try:
    return _reader_class()(path)
  except Exception as e:  # gguf raises ValueError, IndexError, struct errors... on bad files
    size = os.path.getsize(path)
    raise WeightFormatError(
        f'{path}: not a readable GGUF file ({size} bytes; {type(e).__name__}: {e}). The file is '
        'truncated or corrupt: re-download it.') from None


class GGUFSource:
  def __init__(self, path: str):
    self.path = path
    self._reader = _open_reader(path)
    self._tensors = {t.name: t for t in self._reader.tensors}
    size = os.path.getsize(path)
    for t in self._reader.tensors:
      if t.data_offset + t.n_bytes > size:
        raise WeightFormatError(f'{path}: tensor "{t.name}" extends past the end of the file: '
                                'the file is truncated. Re-download it.')

  def field(self, key: str, default=None):
    f = self._reader.fields.get(key)
    if f is None:
      return default
    return f.contents()

  def names(self):
    return self._tensors.keys()

  def describe(self, name: str) -> str:
    return f'{self.path} ({self._tensors[name].tensor_type.name})'

  def get(self, name: str) -> np.ndarray:
    import gguf

    t = self._tensors[name]
    try:
      return gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, gguf.quants.QuantError, ValueError) as e:
      raise WeightFormatError(f'{self.path}: cannot dequantize tensor "{name}" of type '
                              f'{t.tensor_type.name}: {e}') from None

  @property
  def architecture(self) -> str:
    """``general.architecture``, checked to be one this module computes."""
    arch = self.field('general.architecture')
    if arch not in ARCHITECTURES:
      raise UnsupportedConfigError(
          f'{self.path}: general.architecture is "{arch}", but only Llama-architecture models '
          f'({", ".join(map(repr, ARCHITECTURES))}) are supported.')
    return arch

  def config(self) -> LlamaConfig:
    arch = self.architecture
    need = lambda key: self._required(f'{arch}.{key}')
    get = lambda key, default=None: self.field(f'{arch}.{key}', default)
    hidden = int(need('embedding_length'))
    heads = int(need('attention.head_count'))
    head_dim = int(get('attention.key_length', hidden // heads))
    rope_dims = int(get('rope.dimension_count', head_dim))
    if rope_dims != head_dim:
      raise UnsupportedConfigError(f'{self.path}: partial RoPE (rope.dimension_count={rope_dims} '
                                   f'of head_dim={head_dim}) is not implemented.')
    scaling = get('rope.scaling.type', 'none')
    if scaling not in ('none', None):
      raise UnsupportedConfigError(f'{self.path}: rope.scaling.type "{scaling}" is not '
                                   'implemented.')
    window = get('attention.sliding_window')
    if window:
      raise UnsupportedConfigError(f'{self.path}: {arch}.attention.sliding_window={window}: '
                                   'sliding-window attention is not implemented.')
    vocab = get('vocab_size')
    if vocab is None:
      vocab = len(self._required('tokenizer.ggml.tokens'))
    freq_factors = None
    if 'rope_freqs.weight' in self._tensors:  # Llama 3.1 scaling, stored as per-pair divisors
      freq_factors = tuple(float(x) for x in self.get('rope_freqs.weight').reshape(-1))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need('feed_forward_length')),
        num_layers=int(need('block_count')),
        num_heads=heads,
        num_kv_heads=int(get('attention.head_count_kv', heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get('attention.layer_norm_rms_epsilon', 1e-5)),
        rope_theta=float(get('rope.freq_base', 10000.0)),
        rope_freq_factors=freq_factors,
        tie_word_embeddings='output.weight' not in self._tensors,
        max_position_embeddings=int(get('context_length', 8192)),
        qkv_bias=ARCHITECTURES[arch],
    )

  def _required(self, key: str):
    value = self.field(key)
    if value is None:
      raise WeightFormatError(f'{self.path}: GGUF metadata lacks "{key}"; the file is not a '
                              'complete llama.cpp model.')
    return value
