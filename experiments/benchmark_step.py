"""What one descent step costs: our jitted step against PyTorch references, side by side.

The table in docs/performance.md comes from (about 45 minutes on 2 shared CPU cores):

    python experiments/benchmark_step.py --out /tmp/benchmark_step.json

and a first look (batch 8, few-shot prompt, two rounds; about 5 minutes) from:

    python experiments/benchmark_step.py --quick

The problem is the real one: the embedded default model (SmolLM2-135M-Instruct), the built-in
``animal`` feature through ``labeling.prepare`` with ``configs/animal.py``'s config, with the
default few-shot prompt and with the zero-shot chat ``rating`` prompt, at batch sizes 8, 16, 32.
Implementations:

* ``jax``: ours, ``descent.make_step`` in float32 (``jax_bf16``: the same with a bfloat16 model);
* ``torch_full``: a straightforward PyTorch step on ``transformers.LlamaForCausalLM`` (the same
  GGUF weights): softmax of the label logits, ``p @ E`` spliced into the embedded prompt, the
  whole prompt forward (``inputs_embeds``, head on the last position only), the same loss, backward,
  ``torch.optim.Adam``;
* ``torch_cached`` / ``torch_cached_bf16``: as the method's authors do it: every example's prompt
  prefix run once into a ``DynamicCache``; per step the batch's caches are gathered and only
  [label, tail] runs on top of them, in float32 / bfloat16.

Each implementation runs in its own worker process (so its peak resident memory is its own); the
parent times them in alternation, a few steps each per round, so a change in the machine's load
(other jobs share its cores) hits all of them alike. Ratios are medians of per-round ratios. In the
same rounds the workers measure a float32 matmul (2048^3) in JAX and in PyTorch: the rate our step
reaches is reported as a fraction of JAX's. The step's FLOPs are counted analytically (matmuls
only) and cross-checked against XLA's cost analysis. Our steady-state steps run under
``jax.transfer_guard('disallow')``, and the step must compile exactly once.
"""

from __future__ import annotations

import argparse
import dataclasses
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
MATMUL_N = 2048


# --------------------------------------------------------------------------------------------
# The problem, shared by every implementation.

def load_config(prompt: str, batch: int):
  import importlib.util

  spec = importlib.util.spec_from_file_location('animal_config', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(prompt)
  cfg.data.batch_size = batch
  cfg.steps = 1000  # the schedule's length; the benchmark runs far fewer steps
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


class JaxWorker:
  def __init__(self, prompt: str, batch: int, dtype: str):
    import jax
    import jax.numpy as jnp

    from tokenspace_jax import labeling
    from tokenspace_jax.engine import descent
    from tokenspace_jax.models import load_model

    self.jax = jax
    cfg = load_config(prompt, batch)
    cfg.model.dtype = dtype
    start = time.perf_counter()
    self.lm = load_model('default', dtype=jnp.dtype(dtype))
    self.prep = labeling.prepare(cfg, self.lm)
    jax.block_until_ready(self.prep.data)
    self.setup_seconds = time.perf_counter() - start
    self.objective = labeling.make_objective(cfg, self.lm)
    optimizer = descent.make_optimizer(cfg.optim)
    self.state = descent.init_state(labeling.initial_label(cfg, self.lm, self.prep), optimizer)
    self.step_fn = descent.make_step(self.objective, optimizer)
    self.optimizer = optimizer
    self.cfg = cfg

    compile_events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_events.append((name, secs))
        if name.startswith('/jax/core/compile') or 'compile' in name else None)
    start = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.prep.data)
    jax.block_until_ready(metrics)
    self.first_call_seconds = time.perf_counter() - start
    self.compile_seconds = sum(s for n, s in compile_events if n in (
        '/jax/core/compile/jaxpr_trace_duration',
        '/jax/core/compile/jaxpr_to_mlir_module_duration',
        '/jax/core/compile/backend_compile_duration'))
    self.first_loss = float(metrics['loss'])
    self.matmul = jax.jit(lambda a, b: a @ b)
    rng = np.random.default_rng(0)
    self.a = jnp.asarray(rng.standard_normal((MATMUL_N, MATMUL_N), np.float32))
    self.b = jnp.asarray(rng.standard_normal((MATMUL_N, MATMUL_N), np.float32))
    self.a16, self.b16 = self.a.astype(jnp.bfloat16), self.b.astype(jnp.bfloat16)
    self.matmul(self.a, self.b).block_until_ready()
    self.matmul(self.a16, self.b16).block_until_ready()

  def info(self) -> dict:
    data, c = self.prep.data, self.lm.config
    shared = 0 if data.caches.shared_k is None else int(data.caches.shared_k.shape[1])
    return {'setup_seconds': self.setup_seconds, 'first_call_seconds': self.first_call_seconds,
            'compile_seconds': self.compile_seconds, 'first_loss': self.first_loss,
            'shared_tokens': shared, 'own_width': int(data.caches.valid.shape[1]),
            'mean_own_tokens': float(np.asarray(data.caches.valid).sum(1).mean()),
            'tail_tokens': int(data.tail_ids.shape[0]), 'examples': int(data.targets.shape[0]),
            'mean_words': float(np.mean([len(e.text.split()) for e in self.prep.examples])),
            'cache_gb': sum(x.nbytes for x in self.jax.tree.leaves(data.caches)) / 1e9,
            'config': {'layers': c.num_layers, 'hidden': c.hidden_size, 'heads': c.num_heads,
                       'kv_heads': c.num_kv_heads, 'vocab': c.vocab_size}}

  def steps(self, n: int) -> list[float]:
    jax, times = self.jax, []
    # Steady state: nothing may move between host and device, and nothing may recompile.
    with jax.transfer_guard('disallow'):
      for _ in range(n):
        start = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.prep.data)
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
    """Two independent counts of the step's matmul FLOPs, to check ``step_flops`` against.

    ``jaxpr``: every dot_general of the differentiated step's jaxpr, times the length of the scans
    it sits in (this includes the remat recomputation as JAX emits it, before XLA removes what is
    unused). ``xla``: XLA's cost analysis of the compiled step. XLA counts a while loop's body
    once, not once per trip, so the layer scan's bodies are counted once for 30 layers; the step
    is therefore also compiled for a one-layer model (the same weights, cut), where the loop is
    gone, and total = outside + layers * (f(1 layer) - outside), with ``outside`` (head, p @ E)
    from the jaxpr count.
    """
    import jax

    from tokenspace_jax.classifier.objective import Objective
    from tokenspace_jax.engine import descent

    def cut_step(layers: int | None):
      data, objective = self.prep.data, self.objective
      if layers is not None:
        cut = lambda x: None if x is None else x[:layers]
        model = type(objective.model)(dataclasses.replace(self.lm.config, num_layers=layers),
                                      dtype=objective.model.dtype,
                                      param_dtype=objective.model.param_dtype)
        objective = Objective(model, objective.weights, objective.temperature,
                              objective.full_vocab_answer, objective.learn_answer_bias)
        c = data.caches
        data = data.replace(
            params={**data.params, 'layers': jax.tree.map(cut, data.params['layers'])},
            caches=c.replace(k=cut(c.k), v=cut(c.v), shared_k=cut(c.shared_k),
                             shared_v=cut(c.shared_v)))
      return descent.make_step(objective, self.optimizer), data

    def xla(layers: int | None) -> float:
      step, data = cut_step(layers)
      cost = step.lower(self.state, data).compile().cost_analysis()
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

    step, data = cut_step(None)
    jaxpr_total, jaxpr_outside = dots(jax.make_jaxpr(step)(self.state, data).jaxpr, 1, False)
    raw, one = xla(None), xla(1)
    layers = self.lm.config.num_layers
    return {'jaxpr': jaxpr_total, 'jaxpr_outside_layers': jaxpr_outside, 'xla_raw': raw,
            'xla_one_layer': one, 'xla': jaxpr_outside + layers * (one - jaxpr_outside)}


class TorchWorker:
  """The PyTorch references. The model is frozen; only the label logits and bias are trained."""

  def __init__(self, prompt: str, batch: int, mode: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from tokenspace_jax import labeling
    from tokenspace_jax.classifier import label as label_lib
    from tokenspace_jax.classifier import prompts
    from tokenspace_jax.features import BalancedSampler
    from tokenspace_jax.models.default import default_gguf_path
    from tokenspace_jax.models.tokenizer import load_tokenizer

    self.torch = torch
    torch.manual_seed(0)
    start = time.perf_counter()
    cfg = load_config(prompt, batch)
    path = default_gguf_path()
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    self.dtype = torch.float32 if dtype == 'float32' else torch.bfloat16
    model = model.to(self.dtype).eval().requires_grad_(False)
    self.model, self.mode, self.cfg = model, mode, cfg

    # The same examples, prompts and batch schedule as labeling.prepare.
    feature = labeling.load_feature(cfg.feature, tok)
    train = labeling._capped(feature.train, cfg.feature.max_train, cfg.seed)
    heldout = labeling._capped(feature.heldout, cfg.feature.max_heldout, cfg.seed + 1)
    template = prompts.template_from_config(cfg.prompt)
    enc = prompts.encode_prompts(template, tok, [(e.text, e.word)
                                                 for e in train + heldout])
    index = {e: i for i, e in reversed(list(enumerate(train)))}
    fraction = cfg.data.positive_fraction if cfg.data.sampling == 'balanced' else None
    sampler = BalancedSampler(train, batch, positive_fraction=fraction, seed=cfg.seed)
    self.schedule = [[index[e] for e in sampler.batch(t)] for t in range(cfg.steps)]
    n = len(train)
    shared = torch.from_numpy(enc.shared_ids).long()
    own, own_mask = (torch.from_numpy(enc.prefix_ids[:n]).long(),
                     torch.from_numpy(enc.prefix_mask[:n]))
    # Every prompt is [shared | own tokens, left-padded], as in ours: the padding sits between
    # the two parts, masked, and positions count real tokens only.
    self.ids = torch.cat([shared[None].expand(n, -1), own], 1)
    self.mask = torch.cat([torch.ones(n, len(shared), dtype=torch.bool), own_mask], 1)
    self.lengths = self.mask.sum(1)
    self.targets = torch.tensor([e.target for e in train], dtype=torch.float32)
    self.tail_ids = torch.from_numpy(enc.tail_ids).long()
    self.yes, self.no = enc.yes_id, enc.no_id
    vocab = model.config.vocab_size
    self.allowed = torch.from_numpy(label_lib.allowed_tokens(tok, vocab))
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
            'prompt_tokens': int(self.ids.shape[1]), 'threads': self.torch.get_num_threads()}

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


def worker_main(impl: str, prompt: str, batch: int):
  out = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # anything a library prints goes to stderr; stdout carries the protocol
  send = lambda obj: out.write(json.dumps(obj) + '\n')
  try:
    if impl.startswith('jax'):
      worker = JaxWorker(prompt, batch, 'bfloat16' if impl.endswith('bf16') else 'float32')
    else:
      mode = 'cached' if impl.startswith('torch_cached') else 'full'
      worker = TorchWorker(prompt, batch, mode, 'bfloat16' if impl.endswith('bf16')
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
  def __init__(self, impl: str, prompt: str, batch: int, xla_flags: str | None = None):
    self.impl = impl
    env = dict(os.environ)
    if xla_flags is not None:
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--worker', impl.split('@')[0], '--prompt',
         prompt, '--batch', str(batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env=env)
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
      self.ask(cmd='memory')  # flushes nothing; the last memory reading is taken before exit
      self.proc.stdin.write(json.dumps({'cmd': 'exit'}) + '\n')
      self.proc.stdin.close()
    except (BrokenPipeError, RuntimeError):
      pass
    self.proc.wait(timeout=60)


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def run_config(prompt: str, batch: int, impls, rounds: int, steps: dict, log,
               flag_variants: dict | None = None) -> dict:
  from tokenspace_jax.models import read_config
  from tokenspace_jax.models.default import default_gguf_path

  workers = {}
  # One at a time, so a worker's compile time is not inflated by another's setup.
  for impl in impls:
    log(f'  starting {impl} ...')
    try:
      flags = (flag_variants or {}).get(impl.split('@')[1]) if '@' in impl else None
      workers[impl] = Worker(impl, prompt, batch, flags)
    except RuntimeError as e:
      log(f'  {impl} failed: {e}')
  if 'jax' not in workers:
    raise RuntimeError('our step failed to start')
  for w in workers.values():  # warm-up, untimed
    w.ask(cmd='steps', n=2)
  times = {impl: [] for impl in workers}
  per_round = {impl: [] for impl in workers}
  rates = {'jax': [], 'torch': [], 'jax_bf16': [], 'torch_bf16': []}
  loads = [load_average()]
  for r in range(rounds):
    for impl, w in workers.items():
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
  config = read_config(default_gguf_path())
  flops = step_flops(config, batch, 1 + info['tail_tokens'], info['shared_tokens'],
                     info['own_width'])
  ours = statistics.median(times['jax'])
  jax_rate = statistics.median(rates['jax'])
  # The fraction per round (our rate / JAX's matmul rate in the same round), then the median.
  fractions = [flops['total'] / s / rate
               for s, rate in zip(per_round['jax'], rates['jax'], strict=True)]
  rows = []
  for impl, w in workers.items():
    median = statistics.median(times[impl])
    ratio = statistics.median([a / b for a, b in zip(per_round[impl], per_round['jax'],
                                                      strict=True)])
    rows.append({'prompt': prompt, 'batch': batch, 'impl': impl, 'seconds_per_step': median,
                 'steps_per_second': 1 / median, 'ratio_to_ours': ratio,
                 'steps_timed': len(times[impl]), 'first_loss': w.info['first_loss'],
                 'setup_seconds': w.info['setup_seconds'],
                 'compile_seconds': w.info.get('compile_seconds'),
                 'peak_rss_gb': memory[impl]['peak_rss_gb'], 'rss_gb': memory[impl]['rss_gb']})
  return {'prompt': prompt, 'batch': batch, 'rows': rows, 'info': info,
          'torch_info': {i: w.info for i, w in workers.items() if i.startswith('torch')},
          'flops': flops, 'xla_flops': xla, 'our_gflops_per_second': flops['total'] / ours / 1e9,
          'matmul_gflops_per_second': {k: statistics.median(v) / 1e9 for k, v in rates.items()
                                       if v},
          'fraction_of_jax_matmul': statistics.median(fractions),
          'fraction_of_jax_matmul_pooled': flops['total'] / ours / jax_rate,
          'load_average': loads}


def print_table(results: list[dict], log):
  log('')
  log(f'{"prompt":8} {"batch":>5} {"impl":18} {"s/step":>8} {"steps/s":>8} {"x ours":>7} '
      f'{"peak RSS":>9} {"compile":>8}')
  for res in results:
    for r in res['rows']:
      compile_s = f'{r["compile_seconds"]:.1f}s' if r['compile_seconds'] is not None else ''
      log(f'{r["prompt"]:8} {r["batch"]:5d} {r["impl"]:18} {r["seconds_per_step"]:8.3f} '
          f'{r["steps_per_second"]:8.2f} {r["ratio_to_ours"]:7.2f} {r["peak_rss_gb"]:7.2f}GB '
          f'{compile_s:>8}')
    mm = res['matmul_gflops_per_second']
    xla = res['xla_flops']
    log(f'{"":15}step {res["flops"]["total"] / 1e9:.1f} GFLOP (jaxpr {xla["jaxpr"] / 1e9:.1f}, '
        f'XLA {xla["xla"] / 1e9:.1f}); ours {res["our_gflops_per_second"]:.0f} GFLOP/s = '
        f'{100 * res["fraction_of_jax_matmul"]:.0f}% of the f32 matmul rate (JAX '
        f'{mm.get("jax", 0):.0f}, PyTorch {mm.get("torch", 0):.0f} GFLOP/s; bf16: JAX '
        f'{mm.get("jax_bf16", 0):.0f}, PyTorch {mm.get("torch_bf16", 0):.0f}); load '
        f'{res["load_average"][0][0]}-{max(x[0] for x in res["load_average"])}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='/tmp/benchmark_step.json')
  parser.add_argument('--quick', action='store_true', help='batch 8, few-shot prompt, 2 rounds')
  parser.add_argument('--batches', default='8,16,32')
  parser.add_argument('--prompts', default=','.join(PROMPTS))
  parser.add_argument('--impls', default=','.join(IMPLS))
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--full-max-batch', type=int, default=16,
                      help='largest batch for torch_full, whose backward through the whole '
                      'prompt keeps ~10 GB of activations at batch 32')
  parser.add_argument('--xla-variant', action='append', default=[], metavar='NAME=FLAGS',
                      help='also time our step in a worker with these XLA_FLAGS, as jax@NAME')
  parser.add_argument('--worker')
  parser.add_argument('--prompt')
  parser.add_argument('--batch', type=int)
  args = parser.parse_args()
  if args.worker:
    return worker_main(args.worker, args.prompt, args.batch)
  if args.quick:
    args.batches, args.prompts, args.rounds = '8', 'fewshot', 2
  log = lambda s: print(s, flush=True)
  log(f'load average at start: {load_average()} on {os.cpu_count()} CPUs')
  # Seconds per step differ by 50x between implementations: time the slow one less often.
  steps = {'torch_full': 1} if args.quick else {'torch_full': 2, 'jax': 4, 'jax_bf16': 4}
  results = []
  for prompt in args.prompts.split(','):
    for batch in [int(b) for b in args.batches.split(',')]:
      log(f'{prompt}, batch {batch}:')
      variants = dict(v.split('=', 1) for v in args.xla_variant)
      impls = [i for i in args.impls.split(',')
               if i != 'torch_full' or batch <= args.full_max_batch]
      impls += [f'jax@{name}' for name in variants]
      results.append(run_config(prompt, batch, impls, args.rounds, steps, log, variants))
      with open(args.out, 'w') as f:
        json.dump({'command': ' '.join(sys.argv), 'cpus': os.cpu_count(), 'results': results},
                  f, indent=1)
  print_table(results, log)
  log(f'wrote {args.out}')


if __name__ == '__main__':
  main()
