"""What one descent step costs: our jitted step against PyTorch references, side by side.

The tables in docs/performance.md come from commands listed there, e.g. (2 shared CPU cores):

    python experiments/benchmark_step.py --batches 16,32 --out /tmp/benchmark_step.json
    python experiments/benchmark_step.py --model qwen2.5-coder-0.5b --impls jax --batches 16,32
    python experiments/benchmark_step.py --quick      # batch 8, few-shot prompt, two rounds

and, on an accelerator, the step of Llama-3-8B's shapes with random bfloat16 weights (no
download; on a CPU it is only compiled, its memory and FLOPs reported):

    python experiments/benchmark_step.py --model llama3-8b-random --peak_tflops 989

The problem is the real one: a named offline model (``--model``: the embedded default
SmolLM2-135M-Instruct, or Qwen2.5-Coder 0.5B / 1.5B), the built-in ``animal`` feature through the
engine's pool with ``configs/animal.py``'s config, with the default few-shot prompt and with the
zero-shot chat ``rating`` prompt. Implementations:

* ``jax``: ours, as ``main`` runs it: ``engine.pool.build_pool``, ``engine.run.prepare_descent``,
  the rows step with one label row, in float32 (``jax_bf16``: the same with a bfloat16 model);
  ``jax@NAME`` the same in a worker with other XLA flags (``--xla-variant``) or with
  ``tokenspace_jax`` imported from another checkout (``--code``: "now" against "after");
* ``torch_full``: a straightforward PyTorch step on transformers' model of the same GGUF file:
  softmax of the label logits, ``p @ E`` spliced into the embedded prompt, the whole prompt
  forward (``inputs_embeds``, head on the last position only), the same loss, backward,
  ``torch.optim.Adam``;
* ``torch_cached`` / ``torch_cached_bf16``: as the method's authors do it: every example's prompt
  prefix run once into a ``DynamicCache``; per step the batch's caches are gathered and only
  [label, tail] runs on top of them, in float32 / bfloat16.

Every worker computes the same steps: the pool's examples in slot order and its schedule
(``pool.schedules[0]``; with one device the local slots are ``pool.layout.order``'s order), which
the references rebuild without JAX and which the parent checks by digest. Each implementation
runs in its own worker process (so its peak resident memory is its own); the parent times them
in alternation, a few steps each per round, so a change in the machine's load (other jobs share
its cores) hits all of them alike. Ratios are medians of per-round ratios. In the same rounds the
workers measure a float32 matmul (2048^3) in JAX and in PyTorch: the rate our step reaches is
reported as a fraction of JAX's. The step's FLOPs are counted analytically (matmuls only) and
cross-checked against the jaxpr and XLA's cost analysis. Our steady-state steps run under
``jax.transfer_guard('disallow')``, and the step must compile exactly once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'animal.py')
PROMPTS = ('fewshot', 'rating')
IMPLS = ('jax', 'jax_bf16', 'torch_full', 'torch_cached', 'torch_cached_bf16')
MODELS = ('default', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', 'llama3-8b-random')
RANDOM_LLAMA3 = 'llama3-8b-random'
MATMUL_N = 2048


# --------------------------------------------------------------------------------------------
# The problem, shared by every implementation.

def load_config(prompt: str, batch: int, model: str = 'default'):
  import importlib.util

  spec = importlib.util.spec_from_file_location('animal_config', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(prompt)
  cfg.model.source = 'default' if model == RANDOM_LLAMA3 else model
  cfg.data.batch_size = batch
  cfg.steps = 1000  # the schedule's length; the benchmark runs far fewer steps
  # The references compute the paper's loss, on the raw margins: so does the step timed here
  # (the contrast baseline is one subtraction per example, and is computed outside the step).
  cfg.contrast.labels = 0
  return cfg


def step_flops(c, batch: int, new_tokens: int, shared: int, own: int, full_vocab: bool = True,
               label_tokens: int = 1) -> dict:
  """Matmul FLOPs of one descent step, from the shapes (multiply-add = 2 FLOPs).

  Forward: the decoder layers on batch x new_tokens rows, attention of those rows over
  [shared | own | new] keys, the head at the last position (the whole vocabulary for
  ``full_vocab``: its log-sum-exp needs every logit), and ``p @ E``. Backward, with respect to
  activations only (the weights are frozen): the same matmuls again, transposed. The layer remat
  (see models/llama.py) recomputes the attention scores once more; nothing else is recomputed.
  """
  d, hq, hkv = c.head_dim, c.num_heads, c.num_kv_heads
  layer_params = (2 * c.hidden_size * hq * d + 2 * c.hidden_size * hkv * d
                  + 3 * c.hidden_size * c.intermediate_size)
  rows = batch * new_tokens
  dense = 2 * rows * layer_params * c.num_layers
  keys = shared + own + new_tokens
  scores = 2 * rows * hq * d * keys * c.num_layers  # QK^T; PV is as large
  head = 2 * batch * c.hidden_size * (c.vocab_size if full_vocab else 2)
  label = 2 * label_tokens * c.vocab_size * c.hidden_size
  forward = dense + 2 * scores + head + label
  backward = dense + 2 * scores + head + label
  recompute = scores
  return {'forward': forward, 'backward': backward, 'recompute': recompute,
          'total': forward + backward + recompute, 'dense': 2 * dense,
          'attention': 5 * scores, 'head': 2 * head, 'label': 2 * label,
          'layer_params': layer_params * c.num_layers, 'rows': rows, 'keys': keys}


# --------------------------------------------------------------------------------------------
# Workers: one implementation each, driven over stdin/stdout with one JSON object per line.

def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _memory() -> dict:
  import psutil

  return {'rss_gb': psutil.Process().memory_info().rss / 1e9,
          'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def engine_problem(cfg, feature):
  """The examples (in slot order) and the batch schedule ``build_pool`` makes for one feature on
  one device: a reference implementation that follows them needs no JAX pool of its own."""
  from tokenspace_jax.engine.pool import feature_splits
  from tokenspace_jax.parallel import shard_layout

  train, heldout = feature_splits(cfg, feature)
  examples = train + heldout
  targets = np.array([e.target for e in examples], np.float32)
  is_train = np.array([True] * len(train) + [False] * len(heldout))
  layout = shard_layout.layout_examples(targets, is_train, 1, np.zeros(len(examples), np.int64))
  fraction = cfg.data.positive_fraction if cfg.data.sampling == 'balanced' else None
  schedule = shard_layout.shard_schedule(layout, targets, cfg.steps, cfg.data.batch_size,
                                         fraction, cfg.seed, group=0)
  return [examples[i] for i in layout.order], layout, schedule


def own_width(caches) -> int:
  """Keys each example attends after the shared part: its own and its context's (padded)."""
  context = 0 if caches.context_valid is None else caches.context_valid.shape[1]
  return int(caches.valid.shape[1]) + int(context)


def own_tokens(caches) -> np.ndarray:
  """[examples] real tokens each example's cache holds after the shared part."""
  n = np.asarray(caches.valid).sum(1)
  if caches.context_valid is not None:
    n = n + np.asarray(caches.context_valid).sum(1)[np.asarray(caches.context_of)]
  return n


def problem_digest(slot_examples, schedule: np.ndarray) -> str:
  """A hash of the examples in slot order and the schedule: equal in every worker, or the
  implementations would not be computing the same steps."""
  text = json.dumps([[e.text, e.word, float(e.target)] for e in slot_examples])
  return hashlib.sha256(text.encode() + np.asarray(schedule, np.int32).tobytes()).hexdigest()[:16]


class JaxWorker:
  """Our step as ``main`` runs it: ``build_pool`` and ``prepare_descent``, one label row."""

  def __init__(self, model: str, prompt: str, batch: int, dtype: str):
    import jax
    import jax.numpy as jnp

    from tokenspace_jax.engine.pool import build_pool
    from tokenspace_jax.engine.run import prepare_descent
    from tokenspace_jax.features.from_config import load_feature
    from tokenspace_jax.models import load_model

    self.jax = jax
    cfg = load_config(prompt, batch, model)
    cfg.model.dtype = dtype
    start = time.perf_counter()
    self.lm = load_model(model, dtype=jnp.dtype(dtype))
    feature = load_feature(cfg.feature, self.lm.tokenizer, self.lm.config.vocab_size)
    self.pool = build_pool(cfg, self.lm, [feature])
    self.d = prepare_descent(cfg, self.lm, self.pool)
    self.data, self.hp = self.d.data, self.d.hp
    self.state = self.d.state['rows']
    self.active = jnp.ones(len(self.d.specs), bool)
    jax.block_until_ready((self.data, self.state, self.hp, self.active))
    self.setup_seconds = time.perf_counter() - start
    self.pool_seconds = self.pool.seconds
    self.cfg, self.step_fn = cfg, self.d.step

    compile_events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_events.append((name, secs))
        if name.startswith('/jax/core/compile') or 'compile' in name else None)
    start = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.data, self.hp, self.active)
    jax.block_until_ready(metrics)
    self.first_call_seconds = time.perf_counter() - start
    self.compile_seconds = sum(s for n, s in compile_events if n in (
        '/jax/core/compile/jaxpr_trace_duration',
        '/jax/core/compile/jaxpr_to_mlir_module_duration',
        '/jax/core/compile/backend_compile_duration'))
    self.first_loss = float(metrics['loss'][0])
    self.matmul = jax.jit(lambda a, b: a @ b)
    rng = np.random.default_rng(0)
    self.a = jnp.asarray(rng.standard_normal((MATMUL_N, MATMUL_N), np.float32))
    self.b = jnp.asarray(rng.standard_normal((MATMUL_N, MATMUL_N), np.float32))
    self.a16, self.b16 = self.a.astype(jnp.bfloat16), self.b.astype(jnp.bfloat16)
    self.matmul(self.a, self.b).block_until_ready()
    self.matmul(self.a16, self.b16).block_until_ready()

  def info(self) -> dict:
    caches, c = self.pool.caches, self.lm.config
    shared = 0 if caches.shared_k is None else int(caches.shared_k.shape[1])
    return {'setup_seconds': self.setup_seconds, 'pool_seconds': self.pool_seconds,
            'first_call_seconds': self.first_call_seconds,
            'compile_seconds': self.compile_seconds, 'first_loss': self.first_loss,
            'shared_tokens': shared, 'own_width': own_width(caches),
            'mean_own_tokens': float(own_tokens(caches).mean()),
            'tail_tokens': int(self.pool.tail_ids.shape[0]),
            'examples': int(self.pool.slot_targets.shape[0]),
            'mean_words': float(np.mean([len(e.text.split()) for e in self.pool.examples])),
            'cache_gb': sum(x.nbytes for x in self.jax.tree.leaves(caches)) / 1e9,
            'digest': problem_digest([self.pool.examples[i] for i in self.pool.layout.order],
                                     self.pool.schedules[0]),
            'config': {'layers': c.num_layers, 'hidden': c.hidden_size, 'heads': c.num_heads,
                       'kv_heads': c.num_kv_heads, 'vocab': c.vocab_size}}

  def steps(self, n: int) -> list[float]:
    jax, times = self.jax, []
    # Steady state: nothing may move between host and device, and nothing may recompile.
    with jax.transfer_guard('disallow'):
      for _ in range(n):
        start = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.data, self.hp, self.active)
        jax.block_until_ready((self.state, metrics))
        times.append(time.perf_counter() - start)
    compiles = self.step_fn._cache_size()
    if compiles != 1:
      raise RuntimeError(f'the step compiled {compiles} times')
    return times

  def matmul_rate(self) -> dict:
    f32 = _median_time(lambda: self.matmul(self.a, self.b).block_until_ready(), 3)
    bf16 = _median_time(lambda: self.matmul(self.a16, self.b16).block_until_ready(), 2)
    return {'rate': 2 * MATMUL_N ** 3 / f32, 'rate_bf16': 2 * MATMUL_N ** 3 / bf16}

  def xla_flops(self) -> dict:
    return count_flops(self.lm.model, self.cfg, self.state, self.data, self.hp, self.active)


def count_flops(model, cfg, state, data, hp, active, xla: bool = True) -> dict:
  """Two independent counts of the step's matmul FLOPs, to check ``step_flops`` against.

  ``jaxpr``: every dot_general of the differentiated step's jaxpr, times the length of the scans
  it sits in (this includes the remat recomputation as JAX emits it, before XLA removes what is
  unused). ``xla``: XLA's cost analysis of the compiled step. XLA counts a while loop's body
  once, not once per trip, so the layer scan's bodies are counted once for all layers; the step
  is therefore also compiled for a one-layer model (the same weights, cut), where the loop is
  gone, and total = outside + layers * (f(1 layer) - outside), with ``outside`` (head, p @ E)
  from the jaxpr count. Works on arrays and on ``jax.ShapeDtypeStruct``s alike.
  """
  import jax

  from tokenspace_jax.classifier.objective import objective_from_config
  from tokenspace_jax.engine import descent, rows

  def cut_step(layers: int | None):
    m, d = model, data
    if layers is not None:
      cut = lambda x: None if x is None else x[:layers]
      m = type(model)(dataclasses.replace(model.config, num_layers=layers), dtype=model.dtype,
                      param_dtype=model.param_dtype)
      d = jax.eval_shape(lambda d: d.replace(
          params={**d.params, 'layers': jax.tree.map(cut, d.params['layers'])},
          caches=d.caches.replace(k=cut(d.caches.k), v=cut(d.caches.v),
                                  shared_k=cut(d.caches.shared_k),
                                  shared_v=cut(d.caches.shared_v),
                                  context_k=cut(d.caches.context_k),
                                  context_v=cut(d.caches.context_v))), d)
    step = rows.make_rows_step(objective_from_config(cfg, m), descent.make_optimizer(cfg.optim),
                               cfg.optim.lr)
    return step, d

  def xla_count(layers: int | None) -> float:
    step, d = cut_step(layers)
    cost = step.lower(state, d, hp, active).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)['flops'])

  def dots(jaxpr, scale: int, inside_scans: bool) -> tuple[float, float]:
    """(all, outside any scan) dot_general FLOPs of a jaxpr, recursing into sub-jaxprs."""
    total = outside = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        (contract, _), _ = eqn.params['dimension_numbers']
        lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
        flops = 2.0 * np.prod(out.shape) * np.prod([lhs.shape[i] for i in contract]) * scale
        total += flops
        outside += 0 if inside_scans else flops
      is_scan = eqn.primitive.name == 'scan'
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (tuple, list)) else (value,)):
          sub = getattr(sub, 'jaxpr', sub)
          if hasattr(sub, 'eqns'):
            t, o = dots(sub, scale * (eqn.params['length'] if is_scan else 1),
                        inside_scans or is_scan)
            total, outside = total + t, outside + o
    return total, outside

  step, d = cut_step(None)
  jaxpr_total, jaxpr_outside = dots(jax.make_jaxpr(step)(state, d, hp, active).jaxpr, 1, False)
  out = {'jaxpr': jaxpr_total, 'jaxpr_outside_layers': jaxpr_outside}
  if xla:
    raw, one = xla_count(None), xla_count(1)
    out.update(xla_raw=raw, xla_one_layer=one,
               xla=jaxpr_outside + model.config.num_layers * (one - jaxpr_outside))
  return out


class TorchWorker:
  """The PyTorch references. The model is frozen; only the label logits and bias are trained."""

  def __init__(self, model_name: str, prompt: str, batch: int, mode: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from tokenspace_jax.classifier import label as label_lib
    from tokenspace_jax.classifier import prompts
    from tokenspace_jax.features.from_config import load_feature
    from tokenspace_jax.models.loading.load import resolve_source
    from tokenspace_jax.models.tokenizer import load_tokenizer

    self.torch = torch
    torch.manual_seed(0)
    start = time.perf_counter()
    cfg = load_config(prompt, batch, model_name)
    path = resolve_source(model_name)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    self.dtype = torch.float32 if dtype == 'float32' else torch.bfloat16
    model = model.to(self.dtype).eval().requires_grad_(False)
    self.model, self.mode, self.cfg = model, mode, cfg

    # The same examples, prompts and batch schedule as the engine's pool (checked by digest).
    feature = load_feature(cfg.feature, tok, model.config.vocab_size)
    slot_examples, layout, schedule = engine_problem(cfg, feature)
    self.digest = problem_digest(slot_examples, schedule)
    template = prompts.template_from_config(cfg.prompt)
    enc = prompts.encode_prompts(template, tok, [(e.text, e.word) for e in slot_examples])
    # Only the slots a batch draws (the train examples) get a cache and a prior.
    drawn = np.flatnonzero(layout.train[layout.order] & ~layout.padding)
    row_of = np.full(len(slot_examples), -1)
    row_of[drawn] = np.arange(len(drawn))
    self.schedule = row_of[schedule]
    if (self.schedule < 0).any():
      raise RuntimeError('the schedule draws a slot that holds no train example')
    n = len(drawn)
    shared = torch.from_numpy(enc.shared_ids).long()
    own, own_mask = (torch.from_numpy(enc.prefix_ids[drawn]).long(),
                     torch.from_numpy(enc.prefix_mask[drawn]))
    # Every prompt is [shared | own tokens, left-padded], as in ours: the padding sits between
    # the two parts, masked, and positions count real tokens only.
    self.ids = torch.cat([shared[None].expand(n, -1), own], 1)
    self.mask = torch.cat([torch.ones(n, len(shared), dtype=torch.bool), own_mask], 1)
    self.lengths = self.mask.sum(1)
    self.targets = torch.tensor([slot_examples[i].target for i in drawn], dtype=torch.float32)
    self.tail_ids = torch.from_numpy(enc.tail_ids).long()
    self.yes, self.no = enc.yes_id, enc.no_id
    vocab = model.config.vocab_size
    self.allowed = torch.from_numpy(label_lib.allowed_mask(tok, vocab, cfg.label.mask_special))
    self.E = model.get_input_embeddings().weight
    self.tail_emb = self.E[self.tail_ids]

    # The prefix pass, once (set-up, not timed): the shared part, then every example's own
    # tokens on top of it, giving the prior at the slot (for the KL term) and, for the cached
    # reference, every example's whole prefix cache [examples, kv_heads, P, head_dim] per layer.
    from transformers import DynamicCache

    with torch.no_grad():
      out = model(input_ids=shared[None], use_cache=True)
      shared_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
      priors, chunk = [], 32
      if mode == 'cached':
        shape = lambda x: (n, x.shape[1], self.ids.shape[1], x.shape[3])
        self.k = [torch.empty(shape(k), dtype=k.dtype) for k, _ in shared_kv]
        self.v = [torch.empty(shape(v), dtype=v.dtype) for _, v in shared_kv]
      for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        cache = DynamicCache(ddp_cache_data=[(k.expand(hi - lo, -1, -1, -1),
                                              v.expand(hi - lo, -1, -1, -1))
                                             for k, v in shared_kv])
        pos = len(shared) + (own_mask[lo:hi].long().cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=own[lo:hi], attention_mask=self.mask[lo:hi].long(),
                    position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        priors.append(torch.log_softmax(out.logits[:, -1].float(), -1))
        if mode == 'cached':
          for i, layer in enumerate(out.past_key_values.layers):
            self.k[i][lo:hi], self.v[i][lo:hi] = layer.keys, layer.values
        del out, cache
    self.mean_log_prior = torch.cat(priors).mean(0)
    if mode == 'full':
      self.prefix_emb = self.E[self.ids].detach()

    self.logits = torch.zeros(1, vocab, requires_grad=True)
    self.bias = torch.zeros((), requires_grad=True)
    o = cfg.optim
    self.opt = torch.optim.Adam([self.logits, self.bias], lr=o.lr, betas=(o.b1, o.b2))
    self.t = 0
    self.setup_seconds = time.perf_counter() - start
    self.first_loss = self._step()
    self.a = torch.randn(MATMUL_N, MATMUL_N)
    self.b = torch.randn(MATMUL_N, MATMUL_N)
    self.a16, self.b16 = self.a.bfloat16(), self.b.bfloat16()

  def info(self) -> dict:
    return {'setup_seconds': self.setup_seconds, 'first_loss': self.first_loss,
            'prompt_tokens': int(self.ids.shape[1]), 'threads': self.torch.get_num_threads(),
            'digest': self.digest}

  def _step(self) -> float:
    torch, cfg = self.torch, self.cfg
    rows = torch.tensor(self.schedule[min(self.t, len(self.schedule) - 1)])
    batch, new = len(rows), 1 + len(self.tail_ids)
    log_p = torch.log_softmax(torch.where(self.allowed, self.logits / cfg.label.temperature,
                                          torch.tensor(-1e9)), -1)
    p = log_p.exp()
    emb = (p.to(self.dtype) @ self.E)[None].expand(batch, 1, -1)
    tail = self.tail_emb[None].expand(batch, -1, -1)
    mask = self.mask[rows]
    if self.mode == 'cached':
      from transformers import DynamicCache

      cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows])
                                           for k, v in zip(self.k, self.v, strict=True)])
      attention = torch.cat([mask, torch.ones(batch, new, dtype=torch.bool)], 1).long()
      pos = self.lengths[rows][:, None] + torch.arange(new)[None]
      out = self.model(inputs_embeds=torch.cat([emb, tail], 1), attention_mask=attention,
                       position_ids=pos, past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
    else:
      x = torch.cat([self.prefix_emb[rows], emb, tail], 1)
      attention = torch.cat([mask, torch.ones(batch, new, dtype=torch.bool)], 1)
      pos = (attention.long().cumsum(1) - 1).clamp(min=0)
      out = self.model(inputs_embeds=x, attention_mask=attention.long(), position_ids=pos,
                       use_cache=False, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    logits = logits + self.bias * torch.nn.functional.one_hot(
        torch.tensor(self.yes), logits.shape[-1])
    lp = torch.log_softmax(logits, -1)[:, [self.yes, self.no]]
    y = self.targets[rows]
    ce = -(y * lp[:, 0] + (1 - y) * lp[:, 1]).mean()
    entropy = -(p * log_p).sum(-1).mean()
    kl = (p[0] * (log_p[0] - self.mean_log_prior)).sum()
    warmup = cfg.loss.entropy_warmup_steps
    w_entropy = cfg.loss.w_entropy * (min(1.0, (self.t + 1) / warmup) if warmup > 0 else 1.0)
    loss = cfg.loss.w_label * ce + w_entropy * entropy + cfg.loss.w_kl * kl
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    self.t += 1
    return float(loss)

  def steps(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      self._step()
      times.append(time.perf_counter() - start)
    return times

  def matmul_rate(self) -> dict:
    f32 = _median_time(lambda: self.a @ self.b, 3)
    bf16 = _median_time(lambda: self.a16 @ self.b16, 2)
    return {'rate': 2 * MATMUL_N ** 3 / f32, 'rate_bf16': 2 * MATMUL_N ** 3 / bf16}


def worker_main(impl: str, model: str, prompt: str, batch: int, code: str | None):
  out = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # anything a library prints goes to stderr; stdout carries the protocol
  send = lambda obj: out.write(json.dumps(obj) + '\n')
  try:
    if code is not None:
      import tokenspace_jax

      where = os.path.realpath(tokenspace_jax.__file__)
      if not where.startswith(os.path.realpath(code) + os.sep):
        raise RuntimeError(f'tokenspace_jax came from {where}, not from {code}')
    if impl.startswith('jax'):
      worker = JaxWorker(model, prompt, batch, 'bfloat16' if impl.endswith('bf16') else 'float32')
    else:
      mode = 'cached' if impl.startswith('torch_cached') else 'full'
      worker = TorchWorker(model, prompt, batch, mode, 'bfloat16' if impl.endswith('bf16')
                           else 'float32')
    send({'ready': True, **worker.info(), **_memory()})
    for line in sys.stdin:
      cmd = json.loads(line)
      if cmd['cmd'] == 'steps':
        send({'times': worker.steps(cmd['n'])})
      elif cmd['cmd'] == 'matmul':
        send(worker.matmul_rate())
      elif cmd['cmd'] == 'xla_flops':
        send(worker.xla_flops())
      elif cmd['cmd'] == 'memory':
        send(_memory())
      elif cmd['cmd'] == 'exit':
        break
  except Exception as e:  # reported to the parent, which prints it and carries on
    import traceback

    send({'error': f'{type(e).__name__}: {e}', 'traceback': traceback.format_exc()})


# --------------------------------------------------------------------------------------------
# The parent: starts workers, alternates them, prints and writes the table.

class Worker:
  def __init__(self, impl: str, model: str, prompt: str, batch: int,
               xla_flags: str | None = None, code: str | None = None):
    self.impl = impl
    env = dict(os.environ)
    if xla_flags is not None:
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
    command = [sys.executable, os.path.abspath(__file__), '--worker', impl.split('@')[0],
               '--model', model, '--prompt', prompt, '--batch', str(batch)]
    if code is not None:
      env['PYTHONPATH'] = os.pathsep.join([os.path.abspath(code), env.get('PYTHONPATH', '')])
      command += ['--worker-code', os.path.abspath(code)]
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env=env,
                                 cwd=os.path.abspath(code) if code is not None else None)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.impl}: the worker exited')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f'{self.impl}: {reply["error"]}\n{reply.get("traceback", "")}')
    return reply

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + '\n')
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({'cmd': 'exit'}) + '\n')
      self.proc.stdin.close()
    except (BrokenPipeError, RuntimeError):
      pass
    self.proc.wait(timeout=60)


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def run_config(model: str, prompt: str, batch: int, impls, rounds: int, steps: dict, log,
               variants: dict | None = None) -> dict:
  """``variants``: NAME -> ('flags', XLA_FLAGS) or ('code', checkout), for ``jax@NAME``."""
  from tokenspace_jax.models import read_config
  from tokenspace_jax.models.loading.load import resolve_source

  workers = {}
  # One at a time, so a worker's compile time is not inflated by another's setup.
  for impl in impls:
    log(f'  starting {impl} ...')
    kind, value = (variants or {}).get(impl.split('@')[1], (None, None)) if '@' in impl else (
        None, None)
    try:
      workers[impl] = Worker(impl, model, prompt, batch, value if kind == 'flags' else None,
                             value if kind == 'code' else None)
    except RuntimeError as e:
      log(f'  {impl} failed: {e}')
  if 'jax' not in workers:
    raise RuntimeError('our step failed to start')
  digests = {impl: w.info['digest'] for impl, w in workers.items()}
  if len(set(digests.values())) != 1:
    raise RuntimeError(f'the workers would not compute the same steps: {digests}')
  for w in workers.values():  # warm-up, untimed
    w.ask(cmd='steps', n=2)
  times = {impl: [] for impl in workers}
  per_round = {impl: [] for impl in workers}
  rates = {'jax': [], 'torch': [], 'jax_bf16': [], 'torch_bf16': []}
  loads = [load_average()]
  for r in range(rounds):
    # Alternate the order too, so that no worker always runs right after the same other one.
    order = list(workers.items()) if r % 2 == 0 else list(workers.items())[::-1]
    for impl, w in order:
      t = w.ask(cmd='steps', n=steps.get(impl.split('@')[0], 3))['times']
      times[impl] += t
      per_round[impl].append(statistics.median(t))
    jax_rates = workers['jax'].ask(cmd='matmul')
    rates['jax'].append(jax_rates['rate'])
    rates['jax_bf16'].append(jax_rates['rate_bf16'])
    torch_worker = next((w for i, w in workers.items() if i.startswith('torch')), None)
    if torch_worker is not None:
      torch_rates = torch_worker.ask(cmd='matmul')
      rates['torch'].append(torch_rates['rate'])
      rates['torch_bf16'].append(torch_rates['rate_bf16'])
    loads.append(load_average())
    log(f'  round {r + 1}/{rounds}: ' + ', '.join(
        f'{i} {per_round[i][-1]:.3f}s' for i in workers) + f'; load {loads[-1][0]}')
  xla = workers['jax'].ask(cmd='xla_flops')
  memory = {impl: w.ask(cmd='memory') for impl, w in workers.items()}
  for w in workers.values():
    w.close()

  info = workers['jax'].info
  config = read_config(resolve_source(model))
  flops = step_flops(config, batch, 1 + info['tail_tokens'], info['shared_tokens'],
                     info['own_width'])
  jax_rate = statistics.median(rates['jax'])
  rows = []
  for impl, w in workers.items():
    median = statistics.median(times[impl])
    ratio = statistics.median([a / b for a, b in zip(per_round[impl], per_round['jax'],
                                                      strict=True)])
    row = {'model': model, 'prompt': prompt, 'batch': batch, 'impl': impl,
           'seconds_per_step': median, 'steps_per_second': 1 / median, 'ratio_to_ours': ratio,
           'steps_timed': len(times[impl]), 'first_loss': w.info['first_loss'],
           'setup_seconds': w.info['setup_seconds'],
           'pool_seconds': w.info.get('pool_seconds'),
           'compile_seconds': w.info.get('compile_seconds'),
           'cache_gb': w.info.get('cache_gb'),
           'peak_rss_gb': memory[impl]['peak_rss_gb'], 'rss_gb': memory[impl]['rss_gb']}
    if impl.startswith('jax') and not impl.startswith('jax_bf16'):
      # The fraction per round (the step's rate / JAX's matmul rate in the same round).
      fractions = [flops['total'] / s / rate
                   for s, rate in zip(per_round[impl], rates['jax'], strict=True)]
      row['fraction_of_jax_matmul'] = statistics.median(fractions)
      row['fraction_of_jax_matmul_pooled'] = flops['total'] / median / jax_rate
    rows.append(row)
  ours = next(r for r in rows if r['impl'] == 'jax')
  return {'model': model, 'prompt': prompt, 'batch': batch, 'rows': rows, 'info': info,
          'torch_info': {i: w.info for i, w in workers.items() if i.startswith('torch')},
          'flops': flops, 'xla_flops': xla,
          'our_gflops_per_second': flops['total'] / ours['seconds_per_step'] / 1e9,
          'matmul_gflops_per_second': {k: statistics.median(v) / 1e9 for k, v in rates.items()
                                       if v},
          'fraction_of_jax_matmul': ours['fraction_of_jax_matmul'],
          'fraction_of_jax_matmul_pooled': ours['fraction_of_jax_matmul_pooled'],
          'load_average': loads}


def print_table(results: list[dict], log):
  log('')
  log(f'{"model":18} {"prompt":8} {"batch":>5} {"impl":18} {"s/step":>8} {"x ours":>7} '
      f'{"f32 mm":>7} {"peak RSS":>9} {"compile":>8} {"pool":>6}')
  for res in results:
    for r in res['rows']:
      compile_s = f'{r["compile_seconds"]:.1f}s' if r['compile_seconds'] is not None else ''
      pool_s = f'{r["pool_seconds"]:.1f}s' if r.get('pool_seconds') is not None else ''
      share = (f'{100 * r["fraction_of_jax_matmul"]:.0f}%' if 'fraction_of_jax_matmul' in r
               else '')
      log(f'{r["model"]:18} {r["prompt"]:8} {r["batch"]:5d} {r["impl"]:18} '
          f'{r["seconds_per_step"]:8.3f} {r["ratio_to_ours"]:7.2f} {share:>7} '
          f'{r["peak_rss_gb"]:7.2f}GB {compile_s:>8} {pool_s:>6}')
    mm = res['matmul_gflops_per_second']
    xla = res['xla_flops']
    log(f'{"":20}step {res["flops"]["total"] / 1e9:.1f} GFLOP (jaxpr {xla["jaxpr"] / 1e9:.1f}, '
        f'XLA {xla["xla"] / 1e9:.1f}); ours {res["our_gflops_per_second"]:.0f} GFLOP/s = '
        f'{100 * res["fraction_of_jax_matmul"]:.0f}% of the f32 matmul rate (JAX '
        f'{mm.get("jax", 0):.0f}, PyTorch {mm.get("torch", 0):.0f} GFLOP/s; bf16: JAX '
        f'{mm.get("jax_bf16", 0):.0f}, PyTorch {mm.get("torch_bf16", 0):.0f}); load '
        f'{res["load_average"][0][0]}-{max(x[0] for x in res["load_average"])}')


# --------------------------------------------------------------------------------------------
# Llama-3-8B's shapes with random weights: for an accelerator.

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                 rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=8192)


def random_llama3(layers: int | None, materialize: bool, dtype: str = 'bfloat16'):
  """A LoadedModel of Llama-3-8B's shapes (its first ``layers`` layers if given) in ``dtype``.

  The weights are random (normal, std 0.02; norm scales 1), drawn on the device by one jitted
  function so they never pass through the host; with ``materialize`` False they are only shape
  structs, for a compile check on a machine that cannot hold 16 GB of weights. The prompts are
  tokenized with the default model's tokenizer: with random weights only the token count and the
  ids' range matter, and its ids are all below Llama-3's vocabulary.
  """
  import jax
  import jax.numpy as jnp

  from tokenspace_jax.models import Llama, LlamaConfig, LoadedModel
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.loading.param_mapping import abstract_params
  from tokenspace_jax.models.tokenizer import load_tokenizer

  start = time.perf_counter()
  config = LlamaConfig(**{**LLAMA3_8B, 'num_layers': layers or LLAMA3_8B['num_layers']})
  model = Llama(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
  abstract = abstract_params(model)
  params = abstract
  if materialize:
    leaves, treedef = jax.tree.flatten(abstract)
    is_scale = [path[-1].key == 'scale' for path, _ in jax.tree_util.tree_flatten_with_path(
        abstract)[0]]

    @jax.jit
    def init(key):
      keys = jax.random.split(key, len(leaves))
      return treedef.unflatten([
          jnp.ones(x.shape, x.dtype) if scale else 0.02 * jax.random.normal(k, x.shape, x.dtype)
          for k, x, scale in zip(keys, leaves, is_scale, strict=True)])

    params = jax.block_until_ready(init(jax.random.PRNGKey(0)))
  tokenizer = load_tokenizer(default_gguf_path())
  return LoadedModel(model=model, params=params, config=config, tokenizer=tokenizer,
                     path=RANDOM_LLAMA3, load_seconds=time.perf_counter() - start)


def _abstract_pool(cfg, lm, feature):
  """The pool of ``lm`` (whose params are shape structs) with shape structs for its caches and
  priors: ``build_pool`` traced under ``jax.eval_shape``, nothing computed."""
  import jax

  from tokenspace_jax.engine.pool import build_pool

  held = {}

  def build(params):
    pool = build_pool(cfg, dataclasses.replace(lm, params=params), [feature])
    held['pool'] = pool
    return pool.caches, pool.mean_log_priors

  caches, priors = jax.eval_shape(build, lm.params)
  return dataclasses.replace(held['pool'], caches=caches, mean_log_priors=priors)


def _abstract_descent(cfg, lm, pool):
  """``prepare_descent``'s step and arguments for an abstract pool (see ``_abstract_pool``)."""
  import jax
  import jax.numpy as jnp

  from tokenspace_jax.classifier.objective import objective_from_config
  from tokenspace_jax.engine import descent, loop, rows

  specs = rows.row_specs(cfg, len(pool.features))
  optimizer = descent.make_optimizer(cfg.optim)
  priors = np.zeros(pool.mean_log_priors.shape, np.float32)
  state = loop.initial_state(rows.init_rows(cfg, specs, priors, lm.config.vocab_size, None,
                                            optimizer))['rows']
  data = jax.eval_shape(
      lambda params, caches, m: dataclasses.replace(pool, caches=caches, mean_log_priors=m)
      .descent_data(params, specs), lm.params, pool.caches, pool.mean_log_priors)
  step = rows.make_rows_step(objective_from_config(cfg, lm.model), optimizer, cfg.optim.lr)
  return step, state, data, rows.stacked_hyperparameters(specs), jnp.ones(len(specs), bool)


def run_random_llama3(args, log) -> dict:
  """Steps (on an accelerator) or compiles (on a CPU) the step of Llama-3-8B's shapes."""
  import jax

  from tokenspace_jax.engine.pool import build_pool
  from tokenspace_jax.engine.run import prepare_descent
  from tokenspace_jax.features.from_config import load_feature

  device = jax.devices()[0]
  run = device.platform != 'cpu' or args.run_on_cpu
  log(f'{RANDOM_LLAMA3} on {device.device_kind} ({device.platform}): '
      f'{"timing steps" if run else "compile and shape check only (no steps on a CPU)"}')
  lm = random_llama3(args.layers, materialize=run, dtype=args.dtype)
  log(f'  weights ready in {lm.load_seconds:.1f} s')
  results = []
  for prompt in args.prompts.split(','):
    for batch in [int(b) for b in args.batches.split(',')]:
      cfg = load_config(prompt, batch, RANDOM_LLAMA3)
      cfg.model.dtype = args.dtype
      if args.max_examples:
        cfg.feature.max_train = cfg.feature.max_heldout = args.max_examples
      feature = load_feature(cfg.feature, lm.tokenizer, lm.config.vocab_size)
      res = {'model': RANDOM_LLAMA3, 'layers': lm.config.num_layers, 'prompt': prompt,
             'batch': batch, 'device': device.device_kind, 'platform': device.platform,
             'dtype': args.dtype, 'peak_tflops': args.peak_tflops, 'seconds_per_step': None}
      if run:
        pool = build_pool(cfg, lm, [feature])
        d = prepare_descent(cfg, lm, pool)
        step, state, data, hp = d.step, d.state['rows'], d.data, d.hp
        active = jax.numpy.ones(len(d.specs), bool)
        jax.block_until_ready((state, data, hp, active))
        res['pool_seconds'] = pool.seconds
        log(f'  batch {batch}: prefix caches and priors in {pool.seconds:.1f} s')
        start = time.perf_counter()
        state, metrics = step(state, data, hp, active)
        jax.block_until_ready(metrics)
        res['first_call_seconds'] = time.perf_counter() - start
        res['first_loss'] = float(metrics['loss'][0])
        for _ in range(2):  # warm-up
          state, metrics = step(state, data, hp, active)
        jax.block_until_ready((state, metrics))
        times = []
        with jax.transfer_guard('disallow'):
          for _ in range(args.steps):
            start = time.perf_counter()
            state, metrics = step(state, data, hp, active)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        if step._cache_size() != 1:
          raise RuntimeError(f'the step compiled {step._cache_size()} times')
        res['seconds_per_step'] = statistics.median(times)
        res['times'] = times
        stats = device.memory_stats() or {}
        res['peak_device_bytes'] = stats.get('peak_bytes_in_use')
        flops_args = (state, data, hp, active)
      else:
        pool = _abstract_pool(cfg, lm, feature)
        step, state, data, hp, active = _abstract_descent(cfg, lm, pool)
        start = time.perf_counter()
        compiled = step.lower(state, data, hp, active).compile()
        res['compile_seconds'] = time.perf_counter() - start
        memory = compiled.memory_analysis()
        if memory is not None:
          res['compiled_memory_gb'] = {
              k: getattr(memory, f'{k}_size_in_bytes') / 1e9
              for k in ('argument', 'output', 'temp', 'generated_code')
              if hasattr(memory, f'{k}_size_in_bytes')}
        flops_args = (state, data, hp, active)
      caches = pool.caches
      shared = 0 if caches.shared_k is None else int(caches.shared_k.shape[1])
      res.update(shared_tokens=shared, own_width=own_width(caches),
                 tail_tokens=int(pool.tail_ids.shape[0]),
                 examples=int(pool.slot_targets.shape[0]))
      flops = step_flops(lm.config, batch, 1 + res['tail_tokens'], shared, res['own_width'])
      res['flops'] = flops
      res['jaxpr_flops'] = count_flops(lm.model, cfg, *flops_args, xla=False)['jaxpr']
      if res['seconds_per_step']:
        res['tflops_per_second'] = flops['total'] / res['seconds_per_step'] / 1e12
        if args.peak_tflops:
          res['mfu'] = res['tflops_per_second'] / args.peak_tflops
      log(f'  {prompt} batch {batch}: {flops["total"] / 1e12:.2f} TFLOP/step (jaxpr '
          f'{res["jaxpr_flops"] / 1e12:.2f})'
          + (f', {res["seconds_per_step"] * 1e3:.1f} ms/step, '
             f'{res["tflops_per_second"]:.3g} TFLOP/s' if res['seconds_per_step'] else
             f', compiled in {res["compile_seconds"]:.1f} s')
          + (f', MFU {100 * res["mfu"]:.1f}%' if 'mfu' in res else ''))
      results.append(res)
  return {'results': results}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='/tmp/benchmark_step.json')
  parser.add_argument('--quick', action='store_true', help='batch 8, few-shot prompt, 2 rounds')
  parser.add_argument('--model', default='default', choices=MODELS)
  parser.add_argument('--batches', default=None,
                      help=f'default 8,16,32 (16,32 for {RANDOM_LLAMA3})')
  parser.add_argument('--prompts', default=None,
                      help=f'default {",".join(PROMPTS)} (fewshot for {RANDOM_LLAMA3})')
  parser.add_argument('--impls', default=','.join(IMPLS))
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--full-max-batch', type=int, default=16,
                      help='largest batch for torch_full, whose backward through the whole '
                      'prompt keeps ~10 GB of activations at batch 32')
  parser.add_argument('--xla-variant', action='append', default=[], metavar='NAME=FLAGS',
                      help='also time our step in a worker with these XLA_FLAGS, as jax@NAME')
  parser.add_argument('--code', action='append', default=[], metavar='NAME=CHECKOUT',
                      help='also time our step with tokenspace_jax imported from CHECKOUT (e.g. '
                      'a git worktree of an earlier commit), as jax@NAME')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help=f'{RANDOM_LLAMA3}: the device\'s dense bf16 peak, for MFU')
  parser.add_argument('--steps', type=int, default=10, help=f'{RANDOM_LLAMA3}: steps timed')
  parser.add_argument('--layers', type=int, default=None,
                      help=f'{RANDOM_LLAMA3}: only this many layers (a smoke test)')
  parser.add_argument('--max-examples', type=int, default=0,
                      help=f'{RANDOM_LLAMA3}: cap feature.max_train and max_heldout (a smoke '
                      'test)')
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'),
                      help=f'{RANDOM_LLAMA3}: float32 only for a smoke test on a CPU, where '
                      'XLA\'s bfloat16 matmuls at these shapes are too slow to wait for')
  parser.add_argument('--run-on-cpu', action='store_true',
                      help=f'{RANDOM_LLAMA3}: time steps on a CPU too (with --layers)')
  parser.add_argument('--worker')
  parser.add_argument('--worker-code')
  parser.add_argument('--prompt')
  parser.add_argument('--batch', type=int)
  args = parser.parse_args()
  if args.worker:
    return worker_main(args.worker, args.model, args.prompt, args.batch, args.worker_code)
  log = lambda s: print(s, flush=True)
  random_model = args.model == RANDOM_LLAMA3
  args.batches = args.batches or ('16,32' if random_model else '8,16,32')
  args.prompts = args.prompts or ('fewshot' if random_model else ','.join(PROMPTS))
  if args.quick:
    args.batches, args.prompts, args.rounds = '8', 'fewshot', 2
  if random_model:
    out = {'command': ' '.join(sys.argv), **run_random_llama3(args, log)}
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=1)
    log(f'wrote {args.out}')
    return
  log(f'load average at start: {load_average()} on {os.cpu_count()} CPUs')
  # Seconds per step differ by 50x between implementations: time the slow one less often.
  steps = {'torch_full': 1} if args.quick else {'torch_full': 2, 'jax': 4, 'jax_bf16': 4}
  variants = {**{k: ('flags', v) for k, v in (s.split('=', 1) for s in args.xla_variant)},
              **{k: ('code', v) for k, v in (s.split('=', 1) for s in args.code)}}
  results = []
  for prompt in args.prompts.split(','):
    for batch in [int(b) for b in args.batches.split(',')]:
      log(f'{args.model}, {prompt}, batch {batch}:')
      impls = [i for i in args.impls.split(',')
               if i != 'torch_full' or batch <= args.full_max_batch]
      impls += [f'jax@{name}' for name in variants]
      results.append(run_config(args.model, prompt, batch, impls, args.rounds, steps, log,
                                variants))
      with open(args.out, 'w') as f:
        json.dump({'command': ' '.join(sys.argv), 'cpus': os.cpu_count(), 'results': results},
                  f, indent=1)
  print_table(results, log)
  log(f'wrote {args.out}')


if __name__ == '__main__':
  main()
