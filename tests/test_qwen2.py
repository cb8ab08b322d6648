"""Qwen2 (Llama plus Q/K/V biases) against transformers' Qwen2ForCausalLM on random weights.

Every case goes through the real loaders: safetensors from ``save_pretrained``, or a GGUF written
the way llama.cpp's converter writes a ``qwen2`` (biases as F32 vectors, and Q/K rows in HF's
order: it permutes them only for ``llama``). The real Qwen2.5-Coder files are compared in
``test_qwen2_gguf.py``.
"""

from __future__ import annotations

import functools
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from tokenspace_jax.models import (
  KVCache,
  Llama,
  UnsupportedConfigError,
  WeightFormatError,
  greedy_generate,
  load_model,
)
from tokenspace_jax.models.config import config_from_hf_dict
from tokenspace_jax.models.kv_cache import PrefixCache
from tokenspace_jax.models.loading.param_mapping import abstract_params


def _tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, **kw):
  return model.apply({'params': params}, tokens, **kw)


def _our_logits(loaded, tokens: np.ndarray, **kw) -> np.ndarray:
  return np.asarray(_apply(loaded.model, loaded.params, jnp.asarray(tokens, jnp.int32), **kw)[0])


def _without_biases(params: dict) -> dict:
  attn = dict(params['layers']['attn'])
  for name in 'qkv':
    attn[name] = {**attn[name], 'bias': jnp.zeros_like(attn[name]['bias'])}
  return {**params, 'layers': {**params['layers'], 'attn': attn}}


@pytest.fixture(scope='module')
def tiny_qwen2(tmp_path_factory, make_hf_qwen2):
  """(torch model, loaded model) of a tied GQA Qwen2, the shape of the shipped ones."""
  folder = str(tmp_path_factory.mktemp('tiny_qwen2'))
  hf = make_hf_qwen2(folder, seed=11, tie_word_embeddings=True)
  return hf, load_model(folder, with_tokenizer=False)


@pytest.mark.parametrize('heads,kv_heads,tied', [
    (4, 2, True),  # GQA, tied: Qwen2.5-0.5B's shape
    (4, 4, False),  # MHA, untied
    (4, 1, True),  # MQA
], ids=['gqa-tied', 'mha-untied', 'mqa-tied'])
def test_matches_transformers(tmp_path, make_hf_qwen2, heads, kv_heads, tied):
  hf = make_hf_qwen2(str(tmp_path), seed=heads + kv_heads + tied, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, tie_word_embeddings=tied)
  loaded = load_model(str(tmp_path), with_tokenizer=False)
  assert loaded.config.qkv_bias and loaded.config.num_kv_heads == kv_heads
  assert ('lm_head' in loaded.params) == (not tied)
  tokens = _tokens(hf.config.vocab_size, (2, 24))
  ref = _hf_logits(hf, tokens)
  assert ref.std() > 0.5, 'weights too small for the comparison to mean anything'
  got = _our_logits(loaded, tokens)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  # The biases are large enough that dropping them would fail the comparison by far.
  unbiased = np.asarray(_apply(loaded.model, _without_biases(loaded.params),
                               jnp.asarray(tokens))[0])
  assert np.abs(unbiased - ref).max() > 0.1


def test_parameter_trees(tiny_qwen2, tiny_loaded):
  hf, loaded = tiny_qwen2
  c = loaded.config
  leaves = {'/'.join(k): v.shape for k, v in flatten_dict(loaded.params).items()}
  layers, qd, kvd = c.num_layers, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  assert leaves['layers/attn/q/bias'] == (layers, qd)
  assert leaves['layers/attn/k/bias'] == leaves['layers/attn/v/bias'] == (layers, kvd)
  assert sum(int(np.prod(s)) for s in leaves.values()) == c.num_params == hf.num_parameters()
  # The Llama tree is what it always was: the sharding table and checkpoints depend on it.
  llama = {'/'.join(k) for k in flatten_dict(tiny_loaded.params)}
  assert llama == {'embed', 'lm_head', 'final_norm/scale', 'layers/attn_norm/scale',
                   'layers/mlp_norm/scale', *(f'layers/attn/{n}/kernel' for n in 'qkvo'),
                   *(f'layers/mlp/{n}/kernel' for n in ('gate', 'up', 'down'))}
  assert set(leaves) == llama - {'lm_head'} | {f'layers/attn/{n}/bias' for n in 'qkv'}


def test_kv_cache_and_prefix_cache_with_biases(tiny_qwen2):
  # Biases are added before RoPE, so the cached keys must hold them; a prefix run into the
  # cache, then a tail, must give the full forward's logits, through either cache type.
  _, loaded = tiny_qwen2
  c = loaded.config
  tokens = _tokens(c.vocab_size, (2, 20), seed=3)
  tokens[1, :8] = tokens[0, :8]  # a shared 8-token start for the PrefixCache
  full = _our_logits(loaded, tokens)
  cache = KVCache.empty(c, 2, 24)
  head, cache = _apply(loaded.model, loaded.params, jnp.asarray(tokens[:, :14]), cache=cache)
  tail, _ = _apply(loaded.model, loaded.params, jnp.asarray(tokens[:, 14:]), cache=cache)
  np.testing.assert_allclose(np.asarray(head), full[:, :14], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(tail), full[:, 14:], atol=1e-5, rtol=0)
  # The same prefixes as [shared 8 | own 6], attended read-only by rows in swapped order.
  packed = lambda x: x[:, :, 8:14].reshape(x.shape[0], 12, *x.shape[3:])  # row i at 6i
  prefix = PrefixCache(shared_k=cache.k[:, 0, :8], shared_v=cache.v[:, 0, :8],
                       k=packed(cache.k), v=packed(cache.v),
                       valid=jnp.ones((2, 6), bool), starts=jnp.asarray([6, 0], jnp.int32))
  swapped, _ = _apply(loaded.model, loaded.params, jnp.asarray(tokens[::-1, 14:]), cache=prefix)
  np.testing.assert_allclose(np.asarray(swapped), full[::-1, 14:], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(tiny_qwen2):
  hf, loaded = tiny_qwen2
  prompt = _tokens(loaded.config.vocab_size, (9,), seed=5).tolist()
  (ours,) = greedy_generate(loaded.model, loaded.params, None, [prompt], max_new_tokens=12)
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 9, dtype=torch.long),
                      max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
  assert ours == out[0, 9:].tolist()


def _write_qwen2_gguf(hf_model, path: str, qtype: gguf.GGMLQuantizationType,
                      biases: bool = True) -> None:
  """The tensors and metadata convert_hf_to_gguf.py's Qwen2Model writes: no Q/K permutation."""
  c = hf_model.config
  sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
  w = gguf.GGUFWriter(path, 'qwen2')
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'])

  def add(name: str, t: np.ndarray) -> None:
    if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms and biases stay F32
      w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    else:
      w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)

  add('token_embd.weight', sd['model.embed_tokens.weight'])
  for i in range(c.num_hidden_layers):
    p = f'model.layers.{i}.'
    add(f'blk.{i}.attn_norm.weight', sd[p + 'input_layernorm.weight'])
    for x in 'qkv':
      add(f'blk.{i}.attn_{x}.weight', sd[p + f'self_attn.{x}_proj.weight'])
      if biases:
        add(f'blk.{i}.attn_{x}.bias', sd[p + f'self_attn.{x}_proj.bias'])
    add(f'blk.{i}.attn_output.weight', sd[p + 'self_attn.o_proj.weight'])
    add(f'blk.{i}.ffn_norm.weight', sd[p + 'post_attention_layernorm.weight'])
    add(f'blk.{i}.ffn_gate.weight', sd[p + 'mlp.gate_proj.weight'])
    add(f'blk.{i}.ffn_up.weight', sd[p + 'mlp.up_proj.weight'])
    add(f'blk.{i}.ffn_down.weight', sd[p + 'mlp.down_proj.weight'])
  add('output_norm.weight', sd['model.norm.weight'])
  if not c.tie_word_embeddings:
    add('output.weight', sd['lm_head.weight'])
  # The tokenizer's vocabulary is how llama.cpp files give the vocabulary size for qwen2.
  w.add_token_list([f'<{i}>' for i in range(c.vocab_size)])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize('qtype,tied', [
    (gguf.GGMLQuantizationType.F32, True),
    (gguf.GGMLQuantizationType.Q8_0, False),
], ids=['f32-tied', 'q8_0-untied'])
def test_gguf_matches_transformers(tmp_path, make_hf_qwen2, qtype, tied):
  hf = make_hf_qwen2(seed=7, tie_word_embeddings=tied)
  if qtype != gguf.GGMLQuantizationType.F32:  # compare against what the file really holds
    with torch.no_grad():
      for _, p in hf.named_parameters():
        if p.ndim == 2:
          q = gguf.quants.quantize(p.numpy(), qtype)
          p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(p.shape)))
  path = str(tmp_path / 'tiny-qwen2.gguf')
  _write_qwen2_gguf(hf, path, qtype)
  loaded = load_model(path, with_tokenizer=False)
  assert loaded.config.qkv_bias and loaded.config.tie_word_embeddings == tied
  tokens = _tokens(hf.config.vocab_size, (2, 40), seed=4)
  np.testing.assert_allclose(_our_logits(loaded, tokens), _hf_logits(hf, tokens), atol=1e-4,
                             rtol=0)


def test_gguf_without_biases_is_refused(tmp_path, make_hf_qwen2):
  path = str(tmp_path / 'no-bias.gguf')
  _write_qwen2_gguf(make_hf_qwen2(seed=8), path, gguf.GGMLQuantizationType.F32, biases=False)
  with pytest.raises(WeightFormatError,
                     match=r'"blk\.0\.attn_q\.bias" \(for layers/attn/q/bias\) is missing'):
    load_model(path, with_tokenizer=False)


# What Qwen/Qwen2.5-Coder-0.5B-Instruct's config.json says (written by transformers 4.43).
SHIPPED_QWEN25_CONFIG = {
    'architectures': ['Qwen2ForCausalLM'], 'attention_dropout': 0.0, 'bos_token_id': 151643,
    'eos_token_id': 151645, 'hidden_act': 'silu', 'hidden_size': 896, 'initializer_range': 0.02,
    'intermediate_size': 4864, 'max_position_embeddings': 32768, 'max_window_layers': 24,
    'model_type': 'qwen2', 'num_attention_heads': 14, 'num_hidden_layers': 24,
    'num_key_value_heads': 2, 'rms_norm_eps': 1e-06, 'rope_scaling': None, 'rope_theta': 1000000.0,
    'sliding_window': 32768, 'tie_word_embeddings': True, 'torch_dtype': 'bfloat16',
    'transformers_version': '4.43.1', 'use_cache': True, 'use_sliding_window': False,
    'vocab_size': 151936}


def test_shipped_config_parses():
  c = config_from_hf_dict(SHIPPED_QWEN25_CONFIG)
  assert (c.qkv_bias, c.tie_word_embeddings, c.rope_theta, c.head_dim) == (True, True, 1e6, 64)
  assert c.num_params == 494_032_768  # the published parameter count of Qwen2.5-0.5B
  model = Llama(c)
  assert abstract_params(model)['layers']['attn']['k']['bias'].shape == (24, 128)


@pytest.mark.parametrize('changes,says', [
    ({'use_sliding_window': True}, 'use_sliding_window=True is not implemented'),
    ({'layer_types': ['full_attention'] * 23 + ['sliding_attention']},
     "layer_types=['full_attention', "),
    ({'layer_types': ['full_attention'] * 3},
     'layer_types lists 3 layers but num_hidden_layers=24'),
    ({'architectures': ['LlamaForCausalLM']}, "['LlamaForCausalLM'] are not Qwen2ForCausalLM"),
    ({'hidden_act': 'gelu'}, "hidden_act='gelu' is not implemented"),
    ({'rope_scaling': {'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32768}},
     'rope_type "yarn" is not implemented'),
    ({'attention_bias': True}, "attributes this loader does not know: ['attention_bias']"),
], ids=['sliding-window', 'sliding-layer', 'layer-count', 'llama-class', 'gelu', 'yarn',
        'llama-only-key'])
def test_unsupported_qwen2_config_is_refused(tmp_path, changes, says):
  folder = tmp_path / 'model'
  folder.mkdir()
  (folder / 'config.json').write_text(json.dumps({**SHIPPED_QWEN25_CONFIG, **changes}))
  with pytest.raises(UnsupportedConfigError) as e:
    load_model(str(folder), with_tokenizer=False)
  msg = str(e.value)
  assert says in msg and os.path.join(str(folder), 'config.json') in msg, msg
  if 'sliding' in str(changes):
    assert 'Only full-attention checkpoints can be loaded' in msg, msg
