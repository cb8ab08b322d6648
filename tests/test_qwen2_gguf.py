"""The real Qwen2.5-Coder GGUF files (named offline models) against transformers' own GGUF load.

Both sides dequantize the same file, so they should agree to float32 rounding. This is where the
Q/K layout of a llama.cpp ``qwen2`` file is proven: its converter does not permute the rows (it
does for ``llama``), and applying the Llama un-permute here breaks the agreement. Loading each
model twice (ours, then transformers', which parses and dequantizes the file in Python) takes
minutes and, for the 1.5B, twelve gigabytes of float32: the whole module is marked slow.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tokenspace_jax.models import chat, chat_prompt_ids, greedy_generate, load_model
from tokenspace_jax.models.loading.param_mapping import unpermute_k, unpermute_q
from tokenspace_jax.models.tokenizer import gguf_tokenizer

pytestmark = pytest.mark.slow

CODE = '''\
import heapq
from collections import defaultdict


def shortest_paths(edges, source):
    """Distances from source over weighted directed edges (u, v, w), w >= 0."""
    graph = defaultdict(list)
    for u, v, w in edges:
        graph[u].append((v, w))
    dist = {source: 0}
    queue = [(0, source)]
    while queue:
        d, u = heapq.heappop(queue)
        if d > dist.get(u, float("inf")):
            continue
        for v, w in graph[u]:
            nd = d + w
            if nd < dist.get(v, float("inf")):
                dist[v] = nd
                heapq.heappush(queue, (nd, v))
    return dist


def path_exists(edges, source, target):
    return target in shortest_paths(edges, source)


if __name__ == "__main__":
    roads = [("a", "b", 4), ("a", "c", 1), ("c", "b", 2), ("b", "d", 5), ("c", "d", 8)]
    print(shortest_paths(roads, "a"))
    print(path_exists(roads, "d", "a"))
'''
QUESTION = ('Explain step by step what this code does, name the algorithm, give its time '
            'complexity, and suggest one improvement.')


@pytest.fixture(scope='module', params=['qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b'])
def qwen(request):
  return load_model(request.param)


@pytest.fixture(scope='module')
def hf_qwen(qwen):
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(qwen.path), gguf_file=os.path.basename(qwen.path), dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope='module')
def prompt_ids(qwen):
  ids = chat_prompt_ids(qwen.tokenizer, f'{CODE}\n{QUESTION}')
  assert 280 <= len(ids) <= 400, len(ids)
  return ids


def _logits(m, params, ids) -> np.ndarray:
  forward = jax.jit(lambda p, t: m.model.apply({'params': p}, t)[0])
  return np.asarray(forward(params, jnp.asarray([ids], jnp.int32)))[0]


def _with_llama_unpermute(params: dict, config) -> dict:
  """The params as if the file's Q/K rows were interleaved like a llama.cpp ``llama``'s."""
  attn = dict(params['layers']['attn'])
  for name, hook in (('q', unpermute_q), ('k', unpermute_k)):
    perm = hook(np.arange(attn[name]['bias'].shape[-1]), config)
    attn[name] = {'kernel': attn[name]['kernel'][..., perm], 'bias': attn[name]['bias'][..., perm]}
  return {**params, 'layers': {**params['layers'], 'attn': attn}}


def test_logits_match_transformers_gguf_load(qwen, hf_qwen, prompt_ids):
  c = qwen.config
  assert c.qkv_bias and c.rope_theta == 1e6 and c.vocab_size == 151936
  ours = _logits(qwen, qwen.params, prompt_ids)
  with torch.no_grad():
    ref = hf_qwen(torch.tensor([prompt_ids])).logits[0].numpy()
  assert ours.shape == ref.shape == (len(prompt_ids), c.vocab_size)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
  delta = np.abs(ours - ref).max()
  print(f'max |dlogits| {delta:.2e} over {len(prompt_ids)} positions (logit scale '
        f'{np.abs(ref).max():.1f})')
  assert delta <= 2e-3
  # Reading the Q/K rows as llama.cpp lays out a "llama" would be far off.
  permuted = _logits(qwen, _with_llama_unpermute(qwen.params, c), prompt_ids)
  assert (permuted.argmax(-1) == ref.argmax(-1)).mean() < 0.7


def test_greedy_generation_matches_transformers(qwen, hf_qwen, prompt_ids):
  tok = qwen.tokenizer
  (ours,) = greedy_generate(qwen.model, qwen.params, tok, [prompt_ids], max_new_tokens=20)
  with torch.no_grad():
    out = hf_qwen.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(
        1, len(prompt_ids), dtype=torch.long), max_new_tokens=20, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  ref = out[0, len(prompt_ids):].tolist()
  assert len(ours) == 20, tok.decode(ours)  # a step-by-step explanation outlasts 20 tokens
  assert ours == ref, (tok.decode(ours), tok.decode(ref))


def test_chat_writes_code(qwen):
  answer = chat(qwen, 'Write a Python function is_even(n) that returns whether n is even.',
                max_new_tokens=32)
  assert 'def is_even(n' in answer, answer


def test_cached_tokenizer_equals_a_fresh_build(qwen, assert_same_tokenizer):
  # load_model's tokenizer came from the cache folder, or was built and saved there just now;
  # either way the next load reads the cache.
  fresh = gguf_tokenizer(qwen.path, use_cache=False)
  assert_same_tokenizer(fresh, qwen.tokenizer)
  assert_same_tokenizer(fresh, gguf_tokenizer(qwen.path))
  assert qwen.tokenizer.pad_token == '<|endoftext|>' and qwen.tokenizer.eos_token == '<|im_end|>'
