"""Where the descent step's time goes: XLA:CPU's per-thunk trace, grouped by what each op does.

    python experiments/profile_step.py --prompt fewshot --batch 32
    python experiments/profile_step.py --model qwen2.5-coder-0.5b --batch 32 --top 40

The step is built exactly as ``experiments/benchmark_step.py``'s ``jax`` worker builds it (the
engine's pool and rows step, one row), compiled once, and a few steps are traced with
``jax.profiler``. Every thunk of the trace names its HLO instruction; the compiled module's text
says what that instruction is (its opcode, shape, and the JAX operation it came from, e.g.
``.../layers/attn/q/dot_general``), so each one is put in a group: the layer matmuls, copies of
the scanned layer weights, attention's small operations, the head, the rest. Durations are
summed over the threads that ran them (op time, not wall time); the shares say which ops a
change has to remove.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?(%?[\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\w[\w\-]*)\((.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?(%?[\w.\-]+) .*\{$')


def _benchmark():
  spec = importlib.util.spec_from_file_location('benchmark_step',
                                                os.path.join(HERE, 'benchmark_step.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_hlo(text: str) -> tuple[dict, dict]:
  """(instruction name -> {opcode, shape, op_name, computation, calls}, computation -> names)."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m and '=' not in line.split('{')[0]:
      current = m.group(1).lstrip('%')
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.group(1).lstrip('%'), m.group(2), m.group(3), m.group(4)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    calls = re.search(r'calls=%?([\w.\-]+)', rest)
    instructions[name] = {'opcode': opcode, 'shape': shape,
                          'op_name': op_name.group(1) if op_name else '',
                          'computation': current, 'calls': calls.group(1) if calls else None}
    computations[current].append(name)
  return instructions, computations


def group_of(name: str, instructions: dict, computations: dict, runs: float = 1.0) -> str:
  """A coarse label for one thunk's instruction, from its opcode, body and JAX op name.

  ``runs`` is how often the thunk ran per step. Some of XLA:CPU's matmul fusions carry no JAX op
  name (the attention's batched matmuls, on some CPUs); one that runs more than once a step is
  inside the layer loop, where the only unnamed matmuls are the attention's, not the head's.
  """
  inst = instructions.get(name)
  if inst is None:
    return 'unmatched'
  ops = [inst]
  if inst['calls']:
    ops += [instructions[n] for n in computations.get(inst['calls'], [])]
  opcodes = {o['opcode'] for o in ops}
  op_name = ' '.join(o['op_name'] for o in ops)
  big_slice = any(o['opcode'] == 'dynamic-slice' for o in ops) and any(
      k in op_name for k in ('/kernel', 'layers', 'scan')) and 'dot' not in opcodes
  if 'dot' in opcodes or inst['opcode'] in ('dot', 'custom-call') or 'ynn' in name:
    if re.search(r'/(q|k|v|o|gate|up|down)/dot_general', op_name):
      return 'layer matmuls'
    if not op_name.strip() and runs > 1:
      return 'attention matmuls'
    if 'logits' in op_name or 'log_softmax' in op_name or '/embed' in op_name or (
        'layers' not in op_name and 'attn' not in op_name):
      return 'head, p @ E'
    return 'attention matmuls'
  if inst['opcode'] in ('while', 'conditional', 'call'):
    return 'control'
  if inst['opcode'] in ('copy', 'copy-start', 'copy-done'):
    return 'copies'
  if big_slice or (inst['opcode'] == 'dynamic-slice'):
    return 'dynamic slices (weights, caches)'
  if 'attn' in op_name:
    return 'attention small ops'
  if 'norm' in op_name or 'rsqrt' in op_name:
    return 'norms'
  if 'mlp' in op_name:
    return 'MLP elementwise'
  if 'dynamic-update-slice' in opcodes:
    return 'dynamic update slices'
  return 'other'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='default')
  parser.add_argument('--prompt', default='fewshot')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--top', type=int, default=30, help='also list the slowest N ops')
  parser.add_argument('--out', default='/tmp/profile_step.json')
  args = parser.parse_args()

  import jax

  worker = _benchmark().JaxWorker(args.model, args.prompt, args.batch, 'float32')
  compiled = worker.step_fn.lower(worker.state, worker.data, worker.hp, worker.active).compile()
  instructions, computations = parse_hlo(compiled.as_text())
  state = worker.state
  for _ in range(2):
    state, metrics = compiled(state, worker.data, worker.hp, worker.active)
  jax.block_until_ready(metrics)
  trace_dir = tempfile.mkdtemp(prefix='profile_step_')
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state, metrics = compiled(state, worker.data, worker.hp, worker.active)
      jax.block_until_ready((state, metrics))
  wall = (time.perf_counter() - start) / args.steps
  path = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  per_op = collections.Counter()
  count = collections.Counter()
  for e in events:
    hlo_op = (e.get('args') or {}).get('hlo_op')
    if e.get('ph') == 'X' and hlo_op and 'thunk_executor' in e['args'].get('_src', ''):
      per_op[hlo_op] += e['dur'] / 1e6 / args.steps
      count[hlo_op] += 1
  total = sum(per_op.values())
  groups = collections.Counter()
  for name, secs in per_op.items():
    groups[group_of(name, instructions, computations, count[name] / args.steps)] += secs
  print(f'{args.model} {args.prompt} batch {args.batch}: {wall * 1e3:.0f} ms/step wall, '
        f'{total * 1e3:.0f} ms/step of op time over {len(per_op)} distinct thunks, '
        f'{sum(count.values()) / args.steps:.0f} thunk runs per step')
  for g, secs in groups.most_common():
    print(f'  {g:34} {secs * 1e3:8.1f} ms {100 * secs / total:5.1f}%')
  print(f'\nslowest {args.top} ops (ms per step, runs per step, opcode, shape, JAX op):')
  for name, secs in per_op.most_common(args.top):
    inst = instructions.get(name, {})
    print(f'  {secs * 1e3:7.2f} {count[name] / args.steps:5.0f} {name:28} '
          f'{inst.get("opcode", "?"):14} {inst.get("shape", "")[:40]:40} '
          f'{inst.get("op_name", "")[-70:]}')
  with open(args.out, 'w') as f:
    json.dump({'args': vars(args), 'wall_seconds': wall, 'op_seconds': total,
               'groups': dict(groups),
               'ops': {n: {'seconds': s, 'runs': count[n] / args.steps,
                           **instructions.get(n, {})} for n, s in per_op.most_common()}},
              f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
