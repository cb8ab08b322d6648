"""Where the time of loading a named offline model goes, first time and later.

``python -m tokenspace_jax.models.load_timing qwen2.5-coder-0.5b [--cache DIR]`` runs in a fresh
cache folder (a temporary one unless ``--cache`` is given), so the first load pays for the
assembly of the chunks and the tokenizer build, and the second shows what every later run pays.
The figures are printed, not asserted: they belong in docs/models.md beside this command.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from tokenspace_jax.models import cache, load_model, offline
from tokenspace_jax.models.llama import Llama
from tokenspace_jax.models.loading.gguf_source import GGUFSource
from tokenspace_jax.models.loading.param_mapping import (
  GGUF_IGNORED,
  GGUF_RULES_BY_ARCH,
  assemble_params,
)
from tokenspace_jax.models.tokenizer import gguf_tokenizer


def _timed(fn, *args, **kw):
  start = time.perf_counter()
  out = fn(*args, **kw)
  return out, time.perf_counter() - start


def measure(name: str) -> dict[str, float]:
  seconds = {}
  path, seconds['file: first use (assemble + sha256)'] = _timed(offline.gguf_path, name)
  _, seconds['file: later uses (recorded check)'] = _timed(offline.gguf_path, name)
  src, seconds['GGUF metadata parse'] = _timed(GGUFSource, path)
  model = Llama(src.config())
  _, seconds['weights: dequantize + place (float32)'] = _timed(
      assemble_params, src, GGUF_RULES_BY_ARCH[src.architecture], GGUF_IGNORED, model)
  del src
  _, seconds['tokenizer: built from the GGUF'] = _timed(gguf_tokenizer, path, use_cache=False)
  _, seconds['load_model: first (tokenizer built, cached)'] = _timed(load_model, name)
  _, seconds['load_model: later (tokenizer from cache)'] = _timed(load_model, name)
  _, seconds['tokenizer: from the cache'] = _timed(gguf_tokenizer, path)
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('name', choices=sorted(offline.MODELS))
  parser.add_argument('--cache', help='cache folder (default: a fresh temporary one)')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    os.environ[cache.CACHE_ENV] = args.cache or tmp
    for what, s in measure(args.name).items():
      print(f'{what:48s} {s:7.2f} s')


if __name__ == '__main__':
  main()
