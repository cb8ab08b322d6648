"""Our Flax Llama against transformers' LlamaForCausalLM on the same random weights.

Each case goes through the real loaders (safetensors from ``save_pretrained``, or a GGUF written
the way llama.cpp's converter writes one), so a test pass covers config parsing, the name map,
transposes and the Q/K un-permute, not only the forward pass.
"""

from __future__ import annotations

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tokenspace_jax.models import Llama, load_model

LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 64,
               'rope_theta': 10000.0}


def _tokens(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int64)


def _hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf_model(torch.from_numpy(tokens)).logits.float().numpy()


def _our_logits(loaded, tokens: np.ndarray) -> np.ndarray:
  logits, _ = loaded.model.apply({'params': loaded.params}, jnp.asarray(tokens, jnp.int32))
  return np.asarray(logits)


@pytest.mark.parametrize('heads,kv_heads,tied', [
    (4, 4, False),  # MHA
    (4, 4, True),
    (4, 2, False),  # GQA
    (4, 1, True),   # MQA
], ids=['mha-untied', 'mha-tied', 'gqa-untied', 'mqa-tied'])
def test_matches_transformers(tmp_path, make_hf_llama, heads, kv_heads, tied):
  hf = make_hf_llama(str(tmp_path), seed=heads + kv_heads + tied, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, tie_word_embeddings=tied)
  loaded = load_model(str(tmp_path), with_tokenizer=False)
  assert loaded.config.num_kv_heads == kv_heads and loaded.config.tie_word_embeddings == tied
  assert ('lm_head' in loaded.params) == (not tied)
  tokens = _tokens(hf.config.vocab_size, 2, 24)
  ref = _hf_logits(hf, tokens)
  assert ref.std() > 0.5, 'weights too small for the comparison to mean anything'
  np.testing.assert_allclose(_our_logits(loaded, tokens), ref, atol=1e-4, rtol=0)


def test_llama3_rope_scaling_matches_transformers(tmp_path, make_hf_llama):
  # 320 positions against original_max_position_embeddings=64, head_dim 16 and theta 1e4: the
  # pairs fall in all three llama3 bands (unscaled, smoothed, divided by the factor).
  hf = make_hf_llama(str(tmp_path), seed=3, rope_parameters=LLAMA3_ROPE,
                     max_position_embeddings=1024)
  loaded = load_model(str(tmp_path), with_tokenizer=False)
  assert loaded.config.rope_scaling is not None
  tokens = _tokens(hf.config.vocab_size, 1, 320, seed=1)
  ref = _hf_logits(hf, tokens)
  np.testing.assert_allclose(_our_logits(loaded, tokens), ref, atol=1e-4, rtol=0)
  # The test has teeth only if ignoring the scaling would fail it.
  plain = Llama(dataclasses.replace(loaded.config, rope_scaling=None))
  unscaled, _ = plain.apply({'params': loaded.params}, jnp.asarray(tokens, jnp.int32))
  assert np.abs(np.asarray(unscaled) - ref).max() > 1e-2


def test_bfloat16_params_close_to_float32(tiny_hf, tiny_loaded):
  hf, folder = tiny_hf
  low = load_model(folder, param_dtype=jnp.bfloat16, with_tokenizer=False)
  assert low.params['embed'].dtype == jnp.bfloat16
  tokens = _tokens(hf.config.vocab_size, 2, 16, seed=2)
  ref = _our_logits(tiny_loaded, tokens)
  got = _our_logits(low, tokens)
  assert np.isfinite(got).all()
  # bfloat16 weights keep 8 mantissa bits: about 0.4% relative error per weight.
  assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  # convert_hf_to_gguf.py's LlamaModel.permute: HF's half-split RoPE rows to interleaved pairs.
  rows, cols = w.shape
  return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_gguf(hf_model, path: str, qtype: gguf.GGMLQuantizationType) -> None:
  c = hf_model.config
  sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
  w = gguf.GGUFWriter(path, 'llama')
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_dimension_count(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  w.add_vocab_size(c.vocab_size)

  def add(name: str, t: np.ndarray) -> None:
    # llama.cpp keeps norms (1-D) in F32 and quantizes matrices.
    if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
      w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    else:
      w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)

  add('token_embd.weight', sd['model.embed_tokens.weight'])
  for i in range(c.num_hidden_layers):
    p = f'model.layers.{i}.'
    add(f'blk.{i}.attn_norm.weight', sd[p + 'input_layernorm.weight'])
    add(f'blk.{i}.attn_q.weight',
        _llamacpp_permute(sd[p + 'self_attn.q_proj.weight'], c.num_attention_heads))
    add(f'blk.{i}.attn_k.weight',
        _llamacpp_permute(sd[p + 'self_attn.k_proj.weight'], c.num_key_value_heads))
    add(f'blk.{i}.attn_v.weight', sd[p + 'self_attn.v_proj.weight'])
    add(f'blk.{i}.attn_output.weight', sd[p + 'self_attn.o_proj.weight'])
    add(f'blk.{i}.ffn_norm.weight', sd[p + 'post_attention_layernorm.weight'])
    add(f'blk.{i}.ffn_gate.weight', sd[p + 'mlp.gate_proj.weight'])
    add(f'blk.{i}.ffn_up.weight', sd[p + 'mlp.up_proj.weight'])
    add(f'blk.{i}.ffn_down.weight', sd[p + 'mlp.down_proj.weight'])
  add('output_norm.weight', sd['model.norm.weight'])
  if not c.tie_word_embeddings:
    add('output.weight', sd['lm_head.weight'])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _quantization_round_trip(hf_model, qtype: gguf.GGMLQuantizationType) -> None:
  """Replaces every matrix by what it reads back as after quantization, in place."""
  with torch.no_grad():
    for _, p in hf_model.named_parameters():
      if p.ndim == 2:
        q = gguf.quants.quantize(p.numpy(), qtype)
        p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(p.shape)))


@pytest.mark.parametrize('qtype,tied', [
    (gguf.GGMLQuantizationType.F32, False),
    (gguf.GGMLQuantizationType.Q8_0, True),
], ids=['f32-untied', 'q8_0-tied'])
def test_gguf_round_trip_matches_transformers(tmp_path, make_hf_llama, qtype, tied):
  # GQA, so the K un-permute must use the kv head count, not the query head count.
  hf = make_hf_llama(seed=5, num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=tied)
  path = str(tmp_path / 'tiny.gguf')
  _write_gguf(hf, path, qtype)
  loaded = load_model(path, with_tokenizer=False)
  assert loaded.config.tie_word_embeddings == tied
  tokens = _tokens(hf.config.vocab_size, 2, 40, seed=4)
  ref = _hf_logits(hf, tokens)
  got = _our_logits(loaded, tokens)
  if qtype != gguf.GGMLQuantizationType.F32:
    # Quantization moves these large random logits by several percent, too much to tell a
    # loader bug from rounding; so compare exactly against HF on the dequantized weights, and
    # only loosely against the original.
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    _quantization_round_trip(hf, qtype)
    ref = _hf_logits(hf, tokens)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
