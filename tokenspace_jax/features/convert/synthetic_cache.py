"""A synthetic delphi latent cache of any width, to try and time the delphi importer.

    python -m tokenspace_jax.features.convert.synthetic_cache /tmp/cache/latents \\
        --latents=16384 --rows=2048 --ctx=256 --per_latent=200

writes ``{OUT}/{hookpoint}/{start}_{end}.safetensors`` and ``config.json`` laid out as delphi's
``LatentCache.save_splits`` and ``save_config`` write them (see
:mod:`tokenspace_jax.features.convert.from_delphi_cache`). The tokens are ids of the embedded
default tokenizer, cut from the built-in features' sentences (English with some Chinese, so
windows also cut characters apart); each latent fires on a random number of random positions
(geometric around ``per_latent``), with float16 activations. Nothing in it means anything: it
exercises sizes, not labels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def token_stream(tokenizer) -> np.ndarray:
  """Token ids of every built-in sentence, in order."""
  from tokenspace_jax.features.synthetic import SYNTHETIC_FEATURES, _read
  ids = []
  for name in SYNTHETIC_FEATURES:
    for row in _read(name):
      ids += tokenizer(' ' + row['text'], add_special_tokens=False)['input_ids']
  return np.asarray(ids, dtype=np.int64)


def write_cache(out: str, tokenizer, *, latents: int = 16384, rows: int = 2048, ctx: int = 256,
                per_latent: int = 200, n_splits: int = 5, hookpoint: str = 'layers.6.mlp',
                seed: int = 0) -> int:
  """Writes the cache; returns the number of nonzero activations."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(seed)
  stream = token_stream(tokenizer)
  starts = rng.integers(0, len(stream) - ctx, size=rows)
  tokens = np.stack([stream[s:s + ctx] for s in starts])
  folder = os.path.join(out, hookpoint)
  os.makedirs(folder, exist_ok=True)
  boundaries = np.linspace(0, latents, n_splits + 1).astype(np.int64)
  total = 0
  for start, end in zip(boundaries[:-1], boundaries[1:] - 1, strict=True):
    counts = np.minimum(rng.geometric(1 / per_latent, size=end - start + 1), rows * ctx)
    rel = np.repeat(np.arange(end - start + 1), counts)
    flat = rng.integers(0, rows * ctx, size=len(rel))
    keep = np.unique(rel * (rows * ctx) + flat, return_index=True)[1]  # one value per location
    rel, flat = rel[keep], flat[keep]
    order = np.lexsort((rel, flat))  # delphi's nonzero() order: by row, position, latent
    loc = np.stack([flat // ctx, flat % ctx, rel], axis=1)[order]
    dtype = np.uint16 if max(rows, latents) < 2**16 else np.uint32
    acts = rng.lognormal(0.5, 0.6, size=len(loc)).astype(np.float16)
    save_file({'locations': loc.astype(dtype), 'activations': acts, 'tokens': tokens},
              os.path.join(folder, f'{start}_{end}.safetensors'))
    total += len(loc)
  config = {'dataset_repo': 'synthetic', 'dataset_split': '', 'dataset_name': '',
            'dataset_column': 'text', 'batch_size': 32, 'cache_ctx_len': ctx,
            'n_tokens': rows * ctx, 'n_splits': n_splits,
            'model_name': 'HuggingFaceTB/SmolLM2-135M-Instruct'}
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=4)
  return total


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m tokenspace_jax.features.convert.synthetic_cache')
  p.add_argument('out', help='the latents/ folder to write')
  p.add_argument('--latents', type=int, default=16384)
  p.add_argument('--rows', type=int, default=2048)
  p.add_argument('--ctx', type=int, default=256)
  p.add_argument('--per_latent', type=int, default=200, help='mean activations per latent')
  p.add_argument('--splits', type=int, default=5)
  args = p.parse_args(argv)
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer
  n = write_cache(args.out, load_tokenizer(default_gguf_path()), latents=args.latents,
                  rows=args.rows, ctx=args.ctx, per_latent=args.per_latent,
                  n_splits=args.splits)
  print(f'Wrote {n} activations of {args.latents} latents on {args.rows}x{args.ctx} tokens to '
        f'{args.out}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
