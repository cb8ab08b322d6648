"""Fixtures shared by the model tests: the embedded default model and tiny random HF Llamas."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

# One persistent compilation cache for the whole test run, this process and the commands the
# tests start: many tests compile the same functions of the same tiny models (a step, a scorer,
# a prefix pass), and a cache hit skips XLA's compile. Every entry is kept, however quick its
# compile: the tiny models' take under JAX's default threshold of one second. Set before JAX is
# imported, which reads these once; a JAX_COMPILATION_CACHE_DIR already set (to keep the cache
# warm between runs) is used as it is. docs/performance.md ("The test run") has the figures.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='tokenspace-jax-tests-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# The package is used from the checkout, not installed; the pytest script does not put the
# working directory on sys.path the way ``python -m pytest`` does.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenspace_jax.models import load_model  # noqa: E402

# Small enough to compile in about a second, big enough that every axis (heads, kv heads, head
# pairs, layers) is more than one long, so a wrong permutation cannot pass by symmetry.
TINY_HF_CONFIG = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    # HF's default 0.02 gives logits so small that a wrong RoPE hides under any tolerance.
    initializer_range=0.2)


@pytest.fixture(scope='session')
def default_model():
  """The embedded default; a missing install fails (with the install command), never skips."""
  return load_model('default')


def build_hf_llama(folder: str | None = None, seed: int = 0, **overrides):
  """A random float32 ``LlamaForCausalLM``, saved as safetensors to ``folder`` if given.

  Norm weights are randomized too: HF initializes them to ones, which would hide a norm read from
  the wrong tensor.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**{**TINY_HF_CONFIG, **overrides})
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1 + 0.3 * torch.randn_like(p))
  if folder is not None:
    model.save_pretrained(folder, safe_serialization=True)
  return model


@pytest.fixture(scope='session')
def tiny_hf(tmp_path_factory):
  """(torch model, folder) of the default tiny GQA model; read-only, copy before editing."""
  folder = str(tmp_path_factory.mktemp('tiny_hf'))
  return build_hf_llama(folder), folder


@pytest.fixture(scope='session')
def tiny_loaded(tiny_hf):
  return load_model(tiny_hf[1], with_tokenizer=False)


@pytest.fixture(scope='session')
def tiny_folder(tmp_path_factory):
  """An HF folder: a 2-layer random Llama over SmolLM2's vocabulary, with its tokenizer: the
  labeling machinery for real (chat template, prompts, caches) at a tiny model's speed."""
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer
  folder = str(tmp_path_factory.mktemp('tiny_smol'))
  build_hf_llama(folder, vocab_size=49152, hidden_size=32, intermediate_size=64,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 max_position_embeddings=2048, tie_word_embeddings=True)
  load_tokenizer(default_gguf_path()).save_pretrained(folder)
  return folder


@pytest.fixture(scope='session')
def make_hf_llama():
  """``build_hf_llama`` as a fixture, so test modules need not import conftest."""
  return build_hf_llama


def build_hf_qwen2(folder: str | None = None, seed: int = 0, **overrides):
  """A random float32 ``Qwen2ForCausalLM`` (Llama plus Q/K/V biases), saved like
  ``build_hf_llama``. Norm weights and the biases are randomized: HF initializes both to constants
  (ones, zeros), which would let a dropped bias or a bias read into the wrong projection pass."""
  import torch
  import transformers

  torch.manual_seed(seed)
  config = transformers.Qwen2Config(**{**TINY_HF_CONFIG, **overrides})
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif name.endswith('_proj.bias'):
        p.copy_(torch.randn_like(p))
  if folder is not None:
    model.save_pretrained(folder, safe_serialization=True)
  return model


@pytest.fixture(scope='session')
def make_hf_qwen2():
  """``build_hf_qwen2`` as a fixture."""
  return build_hf_qwen2


@pytest.fixture(scope='session')
def assert_same_tokenizer():
  """``check(built, cached)``: what the labeling code uses of a tokenizer is the same in both
  (ids both ways on awkward texts, the chat template, the special and pad tokens)."""
  texts = ['Hello world', '  leading spaces\n\ttabs and trailing  ', '中文字符和 emoji 🤖',
           'def f(x):\n    return x**2  # comment', '<|im_start|>user\nhi<|im_end|>',
           'ÀÉÎ ümlaut']
  chat = [{'role': 'user', 'content': 'What is 2+2?'}]

  def check(built, cached):
    assert type(cached) is type(built) and len(cached) == len(built)
    for text in texts:
      ids = built(text)['input_ids']
      assert cached(text)['input_ids'] == ids, text
      assert cached.decode(ids) == built.decode(ids), text
    assert cached.chat_template == built.chat_template
    assert (cached.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == built.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert cached.special_tokens_map == built.special_tokens_map
    assert cached.all_special_ids == built.all_special_ids
    assert (cached.pad_token, cached.pad_token_id) == (built.pad_token, built.pad_token_id)
    assert (cached.bos_token_id, cached.eos_token_id) == (built.bos_token_id, built.eos_token_id)

  return check
