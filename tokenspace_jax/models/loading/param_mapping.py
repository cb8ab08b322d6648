"""Declarative maps from checkpoint tensor names to our parameter tree, with per-tensor hooks.

A rule says where a tensor comes from and what must happen to it (transpose from PyTorch's
[out, in] to Flax's [in, out], un-permute llama.cpp's Q/K rows); a rule whose target the model's
tree lacks (``lm_head`` of a tied model, the Q/K/V biases of a Llama) is skipped. Assembly fills
each target leaf layer by layer into one preallocated array in the target dtype, so host memory
peaks near one copy of the weights, and checks the result against ``jax.eval_shape(model.init)``:
a missing, extra or misshapen tensor is an error naming it, never a silently random weight.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from tokenspace_jax.models.config import LlamaConfig
from tokenspace_jax.models.llama import Llama
from tokenspace_jax.models.loading.errors import WeightFormatError

Hook = Callable[[np.ndarray, LlamaConfig], np.ndarray]


def transpose(w: np.ndarray, config: LlamaConfig) -> np.ndarray:
  return w.T


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  # llama.cpp stores each head's rows as interleaved (x0, x1) RoPE pairs; HF as two halves.
  rows = w.shape[0]
  return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_q(w: np.ndarray, config: LlamaConfig) -> np.ndarray:
  return _unpermute(w, config.num_heads)


def unpermute_k(w: np.ndarray, config: LlamaConfig) -> np.ndarray:
  return _unpermute(w, config.num_kv_heads)


@dataclasses.dataclass(frozen=True)
class Rule:
  target: str  # '/'-joined path in the params tree
  source: str  # tensor name; '{layer}' marks a per-layer tensor stacked on axis 0
  hooks: tuple[Hook, ...] = ()


HF_RULES = (
    Rule('embed', 'model.embed_tokens.weight'),
    Rule('layers/attn_norm/scale', 'model.layers.{layer}.input_layernorm.weight'),
    Rule('layers/attn/q/kernel', 'model.layers.{layer}.self_attn.q_proj.weight', (transpose,)),
    Rule('layers/attn/k/kernel', 'model.layers.{layer}.self_attn.k_proj.weight', (transpose,)),
    Rule('layers/attn/v/kernel', 'model.layers.{layer}.self_attn.v_proj.weight', (transpose,)),
    Rule('layers/attn/o/kernel', 'model.layers.{layer}.self_attn.o_proj.weight', (transpose,)),
    # Only for a config with qkv_bias (Qwen2): a Llama tree has no bias leaves, so these rules are
    # skipped and a stray bias tensor is refused as unused.
    Rule('layers/attn/q/bias', 'model.layers.{layer}.self_attn.q_proj.bias'),
    Rule('layers/attn/k/bias', 'model.layers.{layer}.self_attn.k_proj.bias'),
    Rule('layers/attn/v/bias', 'model.layers.{layer}.self_attn.v_proj.bias'),
    Rule('layers/mlp_norm/scale', 'model.layers.{layer}.post_attention_layernorm.weight'),
    Rule('layers/mlp/gate/kernel', 'model.layers.{layer}.mlp.gate_proj.weight', (transpose,)),
    Rule('layers/mlp/up/kernel', 'model.layers.{layer}.mlp.up_proj.weight', (transpose,)),
    Rule('layers/mlp/down/kernel', 'model.layers.{layer}.mlp.down_proj.weight', (transpose,)),
    Rule('final_norm/scale', 'model.norm.weight'),
    Rule('lm_head', 'lm_head.weight', (transpose,)),
)
# Present in some checkpoints, derived or duplicated, so safe to leave unread.
HF_IGNORED = re.compile(r'(.*rotary_emb\.inv_freq|lm_head\.weight)$')


def _gguf_rules(unpermute: bool) -> tuple[Rule, ...]:
  q_hooks = (unpermute_q, transpose) if unpermute else (transpose,)
  k_hooks = (unpermute_k, transpose) if unpermute else (transpose,)
  return (
      Rule('embed', 'token_embd.weight'),
      Rule('layers/attn_norm/scale', 'blk.{layer}.attn_norm.weight'),
      Rule('layers/attn/q/kernel', 'blk.{layer}.attn_q.weight', q_hooks),
      Rule('layers/attn/k/kernel', 'blk.{layer}.attn_k.weight', k_hooks),
      Rule('layers/attn/v/kernel', 'blk.{layer}.attn_v.weight', (transpose,)),
      Rule('layers/attn/o/kernel', 'blk.{layer}.attn_output.weight', (transpose,)),
      Rule('layers/attn/q/bias', 'blk.{layer}.attn_q.bias'),
      Rule('layers/attn/k/bias', 'blk.{layer}.attn_k.bias'),
      Rule('layers/attn/v/bias', 'blk.{layer}.attn_v.bias'),
      Rule('layers/mlp_norm/scale', 'blk.{layer}.ffn_norm.weight'),
      Rule('layers/mlp/gate/kernel', 'blk.{layer}.ffn_gate.weight', (transpose,)),
      Rule('layers/mlp/up/kernel', 'blk.{layer}.ffn_up.weight', (transpose,)),
      Rule('layers/mlp/down/kernel', 'blk.{layer}.ffn_down.weight', (transpose,)),
      Rule('final_norm/scale', 'output_norm.weight'),
      Rule('lm_head', 'output.weight', (transpose,)),
  )


# llama.cpp's converter permutes the Q/K rows only for architectures it runs with interleaved
# RoPE pairs (LlamaModel.permute); Qwen2 runs rotate-half ("NEOX") RoPE, so its converter writes
# Q/K (and their biases) in HF's order, and transformers' GGUF loader un-permutes only "llama".
GGUF_RULES_BY_ARCH = {'llama': _gguf_rules(unpermute=True), 'qwen2': _gguf_rules(unpermute=False)}
GGUF_RULES = GGUF_RULES_BY_ARCH['llama']
GGUF_IGNORED = re.compile(r'rope_freqs\.weight$')  # read into the config's RoPE factors


def abstract_params(model: Llama) -> dict:
  """The parameter tree's shapes and dtypes, without allocating it."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))['params']


def assemble_params(source, rules: Sequence[Rule], ignored: re.Pattern, model: Llama,
                    shardings=None) -> dict:
  """Builds the params tree from ``source`` (``names()``, ``get(name)``, ``describe(name)``).

  ``shardings``, if given, is a tree of ``jax.sharding.Sharding`` matching the params: each leaf
  goes straight to its devices, and the host copy is dropped before the next leaf is read.
  """
  config = model.config
  targets = {'/'.join(k): v for k, v in flatten_dict(abstract_params(model)).items()}
  flat_shardings = ({'/'.join(k): v for k, v in flatten_dict(shardings).items()}
                    if shardings is not None else {})
  available = set(source.names())
  used = set()
  out = {}
  for rule in rules:
    if rule.target not in targets:
      continue  # e.g. lm_head of a model with tied embeddings
    spec = targets[rule.target]
    dtype = np.dtype(spec.dtype)
    if '{layer}' in rule.source:
      host = np.empty(spec.shape, dtype)
      for layer in range(config.num_layers):
        host[layer] = _fetch(source, rule.source.format(layer=layer), rule, spec.shape[1:],
                             config, available, used, dtype)
    else:
      host = _fetch(source, rule.source, rule, spec.shape, config, available, used, dtype)
    sharding = flat_shardings.get(rule.target)
    out[rule.target] = jax.device_put(host, sharding) if sharding else jax.device_put(host)
    del host
  missing = sorted(set(targets) - set(out))
  if missing:
    raise WeightFormatError(f'No rule fills the parameters {missing}.')
  extra = sorted(n for n in available - used if not ignored.match(n))
  if extra:
    raise WeightFormatError(
        f'The checkpoint holds tensors this Llama model does not use: {extra[:8]}'
        f'{" ..." if len(extra) > 8 else ""}. They may change the math (biases, extra norms), '
        'so the model is refused.')
  return unflatten_dict({tuple(k.split('/')): v for k, v in out.items()})


def _fetch(source, name, rule, shape, config, available, used, dtype) -> np.ndarray:
  if name not in available:
    raise WeightFormatError(f'Tensor "{name}" (for {rule.target}) is missing from the checkpoint. '
                            'The file is incomplete or not a Llama model.')
  w = source.get(name)
  for hook in rule.hooks:
    w = hook(w, config)
  if w.shape != tuple(shape):
    raise WeightFormatError(
        f'Tensor "{name}" in {source.describe(name)} has shape {w.shape} after conversion, but '
        f'the config needs {tuple(shape)} for {rule.target}. The config and weights disagree.')
  used.add(name)
  return np.asarray(w, dtype=dtype)
