"""Llama-family hyperparameters (Llama, and Qwen2 as Llama with biased Q/K/V), and the refusal of
anything we do not implement.

A config that silently drops an attribute which changes the math (a bias, another activation,
another RoPE variant) would give a model that loads, runs and is quietly wrong. So parsing is
strict: every key of an HF ``config.json`` is either implemented, known to be irrelevant to the
forward pass, or refused with an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class UnsupportedConfigError(ValueError):
  """A model config asks for something this Llama implementation does not compute."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 / 3.2 frequency-dependent RoPE scaling (``rope_type: llama3``)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  # Per-pair frequency divisors as GGUF files store Llama 3.1 scaling (tensor rope_freqs).
  rope_freq_factors: tuple[float, ...] | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 8192
  # Qwen2: the Q, K and V projections add a bias (before RoPE); O and the MLP stay unbiased.
  qkv_bias: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedConfigError(
          f'num_attention_heads={self.num_heads} is not a multiple of '
          f'num_key_value_heads={self.num_kv_heads}; grouped-query attention needs it to be.')
    if self.head_dim % 2:
      raise UnsupportedConfigError(f'head_dim={self.head_dim} must be even for RoPE.')
    if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
      raise UnsupportedConfigError(f'{len(self.rope_freq_factors)} RoPE frequency factors for '
                                   f'head_dim={self.head_dim}; expected {self.head_dim // 2}.')

  @property
  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    biases = self.head_dim * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
    per_layer = attn + biases + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * v
    return v * d + self.num_layers * per_layer + d + head


# Keys of an HF config.json that do not change the forward pass of a causal LM at inference.
_IRRELEVANT_HF_KEYS = frozenset({
    'architectures', 'model_type', 'transformers_version', 'torch_dtype', 'dtype',
    '_name_or_path', '_model_name_or_path', 'name_or_path', 'use_cache', 'initializer_range',
    'bos_token_id', 'eos_token_id', 'pad_token_id', 'unk_token_id', 'sep_token_id',
    'attention_dropout', 'output_hidden_states', 'output_attentions', 'return_dict',
    'chunk_size_feed_forward', 'is_encoder_decoder', 'id2label', 'label2id', 'problem_type',
    'quantization_config', 'tokenizer_class', 'prefix', 'task_specific_params',
    'torchscript', 'use_bfloat16', 'tf_legacy_loss', 'pruned_heads', 'finetuning_task',
    'is_decoder', 'add_cross_attention', 'cross_attention_hidden_size',
    'tie_encoder_decoder', 'decoder_start_token_id', 'max_length', 'min_length',
    'do_sample', 'early_stopping', 'num_beams', 'temperature', 'top_k', 'top_p',
    'repetition_penalty', 'length_penalty', 'no_repeat_ngram_size', 'bad_words_ids',
    'num_return_sequences', 'output_scores', 'return_dict_in_generate',
    'forced_bos_token_id', 'forced_eos_token_id', 'remove_invalid_values',
    'exponential_decay_length_penalty', 'suppress_tokens', 'begin_suppress_tokens',
    'typical_p', 'diversity_penalty', 'num_beam_groups', 'encoder_no_repeat_ngram_size',
    'transformers.js_config', 'auto_map',
})

# Keys that are fine at some values and change the math at others: key -> (accepted?, why not).
_Check = tuple[Any, str]
_NOT_IMPLEMENTED = 'is not implemented by this Llama model.'
_FULL_ATTENTION_ONLY = ('is not implemented: every layer here attends to the whole context, so a '
                        'sliding-window model would be computed wrongly past its window. Only '
                        'full-attention checkpoints can be loaded.')
_BENIGN_IF: dict[str, _Check] = {
    'hidden_act': (lambda v: v == 'silu', _NOT_IMPLEMENTED),
    'use_sliding_window': (lambda v: not v, _FULL_ATTENTION_ONLY),
    # The number of full-attention layers before sliding ones start: read only with
    # use_sliding_window, which is refused above.
    'max_window_layers': (lambda v: True, ''),
    'layer_types': (lambda v: v is None or all(t == 'full_attention' for t in v),
                    _FULL_ATTENTION_ONLY),
}
_BENIGN_IF_BY_TYPE: dict[str, dict[str, _Check]] = {
    'llama': {
        # pretraining_tp > 1 only changes how the original checkpoint was sliced, not the math.
        'pretraining_tp': (lambda v: True, ''),
        'attention_bias': (lambda v: v is False, _NOT_IMPLEMENTED),
        'mlp_bias': (lambda v: v is False, _NOT_IMPLEMENTED),
        'sliding_window': (lambda v: v is None, _FULL_ATTENTION_ONLY),
    },
    # transformers' Qwen2Config drops sliding_window unless use_sliding_window is set (refused),
    # and the shipped Qwen2.5 configs carry a window size next to use_sliding_window=false.
    'qwen2': {'sliding_window': (lambda v: True, '')},
}
# model_type -> (the one architecture class, whether its Q/K/V projections are biased).
_ARCHITECTURES = {'llama': ('LlamaForCausalLM', False), 'qwen2': ('Qwen2ForCausalLM', True)}


def _parse_rope(rope: dict[str, Any] | None,
                theta: float | None) -> tuple[float, RopeScaling | None]:
  rope = dict(rope or {})
  theta = float(rope.pop('rope_theta', theta if theta is not None else 10000.0))
  kind = rope.pop('rope_type', rope.pop('type', 'default'))
  if kind == 'default':
    rope.pop('factor', None)
    if rope:
      raise UnsupportedConfigError(f'rope_type "default" with unexpected keys {sorted(rope)}.')
    return theta, None
  if kind == 'llama3':
    try:
      scaling = RopeScaling(
          factor=float(rope.pop('factor')),
          low_freq_factor=float(rope.pop('low_freq_factor')),
          high_freq_factor=float(rope.pop('high_freq_factor')),
          original_max_position_embeddings=int(rope.pop('original_max_position_embeddings')))
    except KeyError as e:
      raise UnsupportedConfigError(f'rope_type "llama3" is missing the key {e}.') from None
    attention_factor = rope.pop('attention_factor', None)
    if attention_factor not in (None, 1.0):
      raise UnsupportedConfigError(f'llama3 RoPE with attention_factor={attention_factor} is not '
                                   'implemented (only 1.0).')
    if rope:
      raise UnsupportedConfigError(f'llama3 RoPE with unexpected keys {sorted(rope)}.')
    return theta, scaling
  raise UnsupportedConfigError(
      f'rope_type "{kind}" is not implemented; supported: "default" and "llama3". Computing it as '
      'plain RoPE would give wrong logits, so the model is refused.')


def config_from_hf_dict(d: dict[str, Any], *, strict: bool = True) -> LlamaConfig:
  """Builds a LlamaConfig from an HF ``config.json`` dictionary.

  With ``strict`` (the default) an attribute this module does not know is an error: a newer
  transformers release may add something that changes the math. ``strict=False`` ignores unknown
  keys, but never ones known to change the result.
  """
  d = dict(d)
  model_type = d.get('model_type', 'llama')
  if model_type not in _ARCHITECTURES:
    raise UnsupportedConfigError(
        f'model_type is "{model_type}", but only Llama-architecture models '
        f'({", ".join(map(repr, _ARCHITECTURES))}) are supported.')
  arch, qkv_bias = _ARCHITECTURES[model_type]
  archs = d.get('architectures') or [arch]
  if any(a != arch for a in archs):
    raise UnsupportedConfigError(f'architectures {archs} are not {arch} (model_type '
                                 f'"{model_type}").')
  required = ['vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads']
  missing = [k for k in required if k not in d]
  if missing:
    raise UnsupportedConfigError(f'config is missing required keys {missing}.')
  benign = {**_BENIGN_IF, **_BENIGN_IF_BY_TYPE[model_type]}
  for key, (ok, why) in benign.items():
    if key in d and not ok(d[key]):
      raise UnsupportedConfigError(f'{key}={d[key]!r} {why}')
  layer_types = d.get('layer_types')
  if layer_types is not None and len(layer_types) != d['num_hidden_layers']:
    raise UnsupportedConfigError(f'layer_types lists {len(layer_types)} layers but '
                                 f'num_hidden_layers={d["num_hidden_layers"]}.')
  rope = d.get('rope_parameters') or d.get('rope_scaling')
  theta, scaling = _parse_rope(rope, d.get('rope_theta'))
  num_heads = int(d['num_attention_heads'])
  known = set(required) | set(benign) | _IRRELEVANT_HF_KEYS | {
      'num_key_value_heads', 'head_dim', 'rms_norm_eps', 'rope_theta', 'rope_scaling',
      'rope_parameters', 'tie_word_embeddings', 'max_position_embeddings'}
  unknown = sorted(set(d) - known)
  if unknown and strict:
    raise UnsupportedConfigError(
        f'config has attributes this loader does not know: {unknown}. If they do not change the '
        'forward pass, load with strict=False.')
  head_dim = d.get('head_dim') or d['hidden_size'] // num_heads
  return LlamaConfig(
      vocab_size=int(d['vocab_size']),
      hidden_size=int(d['hidden_size']),
      intermediate_size=int(d['intermediate_size']),
      num_layers=int(d['num_hidden_layers']),
      num_heads=num_heads,
      num_kv_heads=int(d.get('num_key_value_heads') or num_heads),
      head_dim=int(head_dim),
      rms_norm_eps=float(d.get('rms_norm_eps', 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      tie_word_embeddings=bool(d.get('tie_word_embeddings', False)),
      max_position_embeddings=int(d.get('max_position_embeddings', 8192)),
      qkv_bias=qkv_bias,
  )


def rope_inverse_frequencies(config: LlamaConfig):
  """Per-pair rotation frequencies, with llama3 scaling applied as transformers does."""
  import numpy as np

  exponent = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** exponent)
  if config.rope_freq_factors is not None:
    inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float64)
  s = config.rope_scaling
  if s is None:
    return inv_freq.astype(np.float32)
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


PRESETS = {
    # meta-llama/Meta-Llama-3-8B-Instruct
    'llama3-8b': LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192),
    # meta-llama/Llama-3.2-1B-Instruct
    'llama3.2-1b': LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
        max_position_embeddings=131072),
    # HuggingFaceTB/SmolLM2-135M-Instruct
    'smollm2-135m': LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, max_position_embeddings=8192),
}
