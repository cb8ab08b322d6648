"""Parameter counts of real Llama sizes, from abstract shapes only (no memory is allocated).

The counts are the published ones, so a missing, duplicated or misshapen parameter in the module
would show here before anyone downloads 16 GB to find out.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from tokenspace_jax.models import Llama
from tokenspace_jax.models.config import PRESETS, config_from_hf_dict

# config.json of meta-llama/Meta-Llama-3-8B-Instruct (transformers 4.40 era).
LLAMA3_8B_HF = {
    'architectures': ['LlamaForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
    'bos_token_id': 128000, 'eos_token_id': 128009, 'hidden_act': 'silu', 'hidden_size': 4096,
    'initializer_range': 0.02, 'intermediate_size': 14336, 'max_position_embeddings': 8192,
    'model_type': 'llama', 'num_attention_heads': 32, 'num_hidden_layers': 32,
    'num_key_value_heads': 8, 'pretraining_tp': 1, 'rms_norm_eps': 1e-05, 'rope_scaling': None,
    'rope_theta': 500000.0, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
    'transformers_version': '4.40.0.dev0', 'use_cache': True, 'vocab_size': 128256,
}

# config.json of meta-llama/Llama-3.2-1B-Instruct (transformers 4.45 era).
LLAMA32_1B_HF = {
    'architectures': ['LlamaForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
    'bos_token_id': 128000, 'eos_token_id': [128001, 128008, 128009], 'head_dim': 64,
    'hidden_act': 'silu', 'hidden_size': 2048, 'initializer_range': 0.02,
    'intermediate_size': 8192, 'max_position_embeddings': 131072, 'mlp_bias': False,
    'model_type': 'llama', 'num_attention_heads': 32, 'num_hidden_layers': 16,
    'num_key_value_heads': 8, 'pretraining_tp': 1, 'rms_norm_eps': 1e-05,
    'rope_scaling': {'factor': 32.0, 'high_freq_factor': 4.0, 'low_freq_factor': 1.0,
                     'original_max_position_embeddings': 8192, 'rope_type': 'llama3'},
    'rope_theta': 500000.0, 'tie_word_embeddings': True, 'torch_dtype': 'bfloat16',
    'transformers_version': '4.45.0.dev0', 'use_cache': True, 'vocab_size': 128256,
}


def _count(preset: str) -> int:
  model = Llama(PRESETS[preset], param_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize('preset,expected', [
    ('llama3-8b', 8_030_261_248),
    ('llama3.2-1b', 1_235_814_400),
])
def test_parameter_count(preset, expected):
  assert _count(preset) == expected
  assert PRESETS[preset].num_params == expected


@pytest.mark.parametrize('hf,preset', [(LLAMA3_8B_HF, 'llama3-8b'),
                                       (LLAMA32_1B_HF, 'llama3.2-1b')])
def test_hf_config_parses_to_preset(hf, preset):
  assert config_from_hf_dict(hf) == PRESETS[preset]


def test_transformers5_config_parses_to_preset():
  # transformers 5 rewrites rope_scaling and rope_theta into rope_parameters and adds its own
  # keys; the strict parser must still accept what it writes.
  import transformers

  written = transformers.LlamaConfig(**LLAMA32_1B_HF).to_dict()
  assert 'rope_parameters' in written
  assert config_from_hf_dict(written) == PRESETS['llama3.2-1b']
