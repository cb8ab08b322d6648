"""Load time and peak host memory of the embedded default; one 300-token forward, JAX vs PyTorch.

    python experiments/benchmark_load_forward.py

Prints the load time of ``load_model('default')`` (with and without building the tokenizer),
the process's peak resident memory right after that load, and the median time of a jitted JAX
forward over a 300-token chat prompt against transformers' own float32 forward of the same GGUF
file, timed alternately in one run so machine noise hits both alike. Run it in a fresh process:
the peak memory is the process's.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main(repeats: int = 7):
  from tokenspace_jax.models import chat_prompt_ids, load_model

  lm = load_model('default')
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  bare = load_model('default', with_tokenizer=False).load_seconds

  import torch
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(os.cpu_count() or 1)
  ref = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(lm.path), gguf_file=os.path.basename(lm.path),
      dtype=torch.float32).eval()

  text = ' '.join(['The quick brown fox jumps over the lazy dog near the river bank.'] * 40)
  ids = chat_prompt_ids(lm.tokenizer, f'{text}\nSummarise the text.')[:300]
  forward = jax.jit(lambda p, t: lm.model.apply({'params': p}, t)[0])
  tokens = jnp.asarray([ids], jnp.int32)
  start = time.perf_counter()
  ours = forward(lm.params, tokens).block_until_ready()
  compile_s = time.perf_counter() - start
  x = torch.tensor([ids])
  jax_s, torch_s = [], []
  with torch.no_grad():
    theirs = ref(x).logits
    for _ in range(repeats):  # alternate, so both see the same machine
      start = time.perf_counter()
      ours = forward(lm.params, tokens).block_until_ready()
      jax_s.append(time.perf_counter() - start)
      start = time.perf_counter()
      theirs = ref(x).logits
      torch_s.append(time.perf_counter() - start)
  diff = np.abs(np.asarray(ours)[0] - theirs[0].numpy()).max()
  j, t = statistics.median(jax_s), statistics.median(torch_s)
  print(f'load_model("default"): {lm.load_seconds:.1f} s ({bare:.1f} s without the tokenizer); '
        f'peak RSS after load {peak_mib:.0f} MiB')
  print(f'{len(ids)}-token forward, median of {repeats}: JAX {j * 1e3:.0f} ms (first call with '
        f'compilation {compile_s:.1f} s), transformers float32 {t * 1e3:.0f} ms: '
        f'{t / j:.1f}x; max |dlogits| {diff:.1e}; load average {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
