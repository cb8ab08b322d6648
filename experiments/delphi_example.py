"""A delphi latent cache whose latents fire on known concepts, labeled end to end.

    python experiments/delphi_example.py [--out=/tmp/delphi_example] [--latents=3] \\
        [--model=default] [--config=configs/batch.py:quick]

The own_feature.md worked example: what a delphi user would do with this project, run for real,
on a cache whose right answers are known, so the labels can be judged. Four steps, each a
command of the project (printed, then run, and timed):

1. The cache: ``OUT/results/example/latents/layers.6.mlp/0_{n-1}.safetensors`` and
   ``config.json``, laid out as delphi's ``LatentCache.save_splits`` / ``save_config`` write them
   (as ``tokenspace_jax.features.convert.synthetic_cache`` does for timing, but planted): the
   tokens are the built-in features' 918 sentences (ids of the default tokenizer, each sentence
   followed by ``<|endoftext|>`` as a tokenized dataset joins documents, shuffled, cut into rows
   of ``--ctx``), and latent ``i`` fires on the words of concept ``CONCEPTS[i]`` (animal, number,
   chinese, mammal), each word's tokens with one lognormal activation (median 3).
2. ``tokenspace_jax.features.convert --from=delphi`` turns it into records.
3. ``tokenspace_jax.batch`` labels every latent with ``--model``.
4. ``tokenspace_jax.outputs.export --format=delphi`` writes ``OUT/results/example/
   explanations/layers.6.mlp_latent{i}.txt``, next to the cache as in a delphi run folder, where
   ``python -m delphi ... --name example --explainer none`` would read them and go on to score.

Where a latent fires. A sentence of its own concept's data file: exactly the hand-labeled
positive spans. A sentence of another file, whose hand labels are about something else: each
word whose lowercase form is one of the concept's positive words and never one of its hard
negatives (so ' cats' in a number sentence fires the animal latent, ' bear' nowhere outside the
animal file, as it is also "bear in mind" there); besides, the animal latent fires on every
positive and hard negative of the mammal file (by the files' conventions all are animals), and
the mammal latent, in the animal file, only on animal positives that are such mammal words
(' Jaguar' the car stays silent). The ground truth is therefore the files' labels, extended by
word lookup where a file says nothing: good, not perfect; nothing was tuned on the results.

Prints each latent's planted concept, label, held-out AUROCs and verdict, and writes
``OUT/summary.json`` with them and the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPTS = ('animal', 'number', 'chinese', 'mammal')
HOOKPOINT = 'layers.6.mlp'
RUN_NAME = 'example'


def _data(name: str) -> list[dict]:
  from tokenspace_jax.features.synthetic import _read
  return list(_read(name))


def firing_spans(concepts) -> list[tuple[str, list[list[tuple[int, int]]]]]:
  """Every built-in sentence with, per concept, the character spans its latent fires on."""
  from tokenspace_jax.features.synthetic import _WORD_RE, SYNTHETIC_FEATURES
  data = {name: _data(name) for name in SYNTHETIC_FEATURES}
  words = {}
  for c in concepts:
    pos = {r['text'][s:e].lower() for r in data[c] for s, e in r['positive']}
    neg = {r['text'][s:e].lower() for r in data[c] for s, e in r['hard_negative']}
    words[c] = pos - neg
  out = []
  for name in SYNTHETIC_FEATURES:
    for r in data[name]:
      text, spans = r['text'], []
      for c in concepts:
        if name == c:
          fire = [tuple(s) for s in r['positive']]
        elif c == 'animal' and name == 'mammal':
          fire = [tuple(s) for s in r['positive'] + r['hard_negative']]
        elif c == 'mammal' and name == 'animal':
          fire = [tuple(s) for s in r['positive'] if text[s[0]:s[1]].lower() in words[c]]
        else:
          fire = [m.span() for m in _WORD_RE.finditer(text) if m.group().lower() in words[c]]
        spans.append(sorted(fire))
      out.append((text, spans))
  return out


def write_planted_cache(latents_dir: str, tokenizer, concepts, *, ctx: int = 64,
                        seed: int = 0) -> dict:
  """Writes the cache (one split holding every latent); returns its sizes."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(seed)
  sentences = firing_spans(concepts)
  order = rng.permutation(len(sentences))
  eos = tokenizer.convert_tokens_to_ids('<|endoftext|>')
  ids, acts = [], []  # acts: [tokens, latents]
  for i in order:
    text, spans = sentences[i]
    enc = tokenizer(' ' + text, add_special_tokens=False, return_offsets_mapping=True)
    a = np.zeros((len(enc['input_ids']) + 1, len(concepts)), np.float32)
    for latent, fire in enumerate(spans):
      for s, e in fire:
        value = rng.lognormal(np.log(3.0), 0.4)
        for t, (ts, te) in enumerate(enc['offset_mapping']):
          if ts - 1 < e and te - 1 > s:  # offsets count the leading space
            a[t, latent] = value
    ids += enc['input_ids'] + [eos]
    acts.append(a)
  acts = np.concatenate(acts)
  rows = len(ids) // ctx
  tokens = np.asarray(ids[:rows * ctx], np.int64).reshape(rows, ctx)
  dense = acts[:rows * ctx].reshape(rows, ctx, len(concepts))
  locations = np.stack(np.nonzero(dense), axis=1)  # delphi's order: row, position, latent
  folder = os.path.join(latents_dir, HOOKPOINT)
  os.makedirs(folder, exist_ok=True)
  save_file({'locations': locations.astype(np.uint16),
             'activations': dense[tuple(locations.T)].astype(np.float16), 'tokens': tokens},
            os.path.join(folder, f'0_{len(concepts) - 1}.safetensors'))
  config = {'dataset_repo': 'tokenspace_jax built-in sentences', 'dataset_split': '',
            'dataset_name': '', 'dataset_column': 'text', 'batch_size': 8,
            'cache_ctx_len': ctx, 'n_tokens': int(tokens.size), 'n_splits': 1,
            'model_name': 'HuggingFaceTB/SmolLM2-135M-Instruct'}
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=4)
  return {'rows': rows, 'ctx': ctx, 'nonzero': len(locations),
          'firing_tokens': {c: int((dense[..., i] > 0).sum()) for i, c in enumerate(concepts)}}


def add_reference_words(records: str, concepts) -> None:
  """Gives each latent's records its planted concept's word as ``reference_word``, so the
  found label is scored next to the right answer. A delphi cache has no such word: this is the
  one step a real user would skip (or fill with their own guess)."""
  from tokenspace_jax.features.synthetic import _REFERENCE_WORDS
  with open(records, encoding='utf-8') as f:
    lines = [json.loads(x) for x in f]
  for r in lines:
    r['reference_word'] = _REFERENCE_WORDS[concepts[r['source']['latent']]]
  with open(records, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in lines)
  print(f'(added the planted concepts {[_REFERENCE_WORDS[c] for c in concepts]} to {records} '
        'as reference_word)')


def _run(args: list[str], timings: dict, key: str) -> None:
  print('$ ' + ' '.join(shlex.quote(a) for a in args), flush=True)
  start = time.perf_counter()
  subprocess.run(args, cwd=ROOT, check=True)
  timings[key] = round(time.perf_counter() - start, 1)
  print(f'  ({timings[key]} s)', flush=True)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', default='/tmp/delphi_example')
  p.add_argument('--latents', type=int, default=3, choices=range(1, len(CONCEPTS) + 1),
                 help=f'how many planted latents, of {", ".join(CONCEPTS)} in this order')
  p.add_argument('--model', default='default', help='--config.model.source of the labeling')
  p.add_argument('--config', default='configs/batch.py:quick', help='the batch job\'s config')
  p.add_argument('--no_reference', action='store_true',
                 help='leave the records without the planted concept as reference_word')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='more --config.KEY=VALUE for the batch job (repeatable)')
  args = p.parse_args(argv)
  from tokenspace_jax.models.default import default_gguf_path
  from tokenspace_jax.models.tokenizer import load_tokenizer

  concepts = CONCEPTS[:args.latents]
  run_dir = os.path.join(args.out, 'results', RUN_NAME)
  latents_dir = os.path.join(run_dir, 'latents')
  records = os.path.join(args.out, 'records.jsonl')
  workdir = os.path.join(args.out, 'batch')
  timings = {}
  start = time.perf_counter()
  sizes = write_planted_cache(latents_dir, load_tokenizer(default_gguf_path()), concepts)
  timings['cache'] = round(time.perf_counter() - start, 1)
  print(f'Cache: {sizes} in {latents_dir} ({timings["cache"]} s)')
  py = sys.executable
  _run([py, '-m', 'tokenspace_jax.features.convert', '--from=delphi', latents_dir,
        '--tokenizer=default', '--labeling_tokenizer=default', f'--out={records}'],
       timings, 'convert')
  if not args.no_reference:
    add_reference_words(records, concepts)
  _run([py, '-m', 'tokenspace_jax.batch', f'--config={args.config}',
        f'--config.features={records}', f'--config.model.source={args.model}',
        *(f'--config.{kv}' for kv in args.set), f'--workdir={workdir}'], timings, 'batch')
  _run([py, '-m', 'tokenspace_jax.outputs.export', '--format=delphi',
        f'--labels={workdir}/labels.jsonl', f'--out={run_dir}'], timings, 'export')

  with open(os.path.join(workdir, 'labels.jsonl'), encoding='utf-8') as f:
    lines = {line['feature_id']: line for line in map(json.loads, f)}
  summary = {'concepts': list(concepts), 'cache': sizes, 'seconds': timings, 'latents': []}
  print(f'\n{"latent":<22} {"planted":<8} {"label":<10} {"descent ended on":<19} {"steps":>5}  '
        f'{"found":>5} {"ref":>5} {"random":>6} {"window":>6}  verdict')
  for i, concept in enumerate(concepts):
    fid = f'{HOOKPOINT}_latent{i}'
    line = lines.get(fid, {})
    path = os.path.join(run_dir, 'explanations', f'{fid}.txt')
    explanation = open(path, encoding='utf-8').read() if os.path.exists(path) else None
    entry = {'latent': fid, 'planted': concept, 'explanation_file': explanation,
             **{k: line.get(k) for k in ('label', 'probability', 'descent_label', 'top5', 'steps',
                                         'auroc', 'scores', 'identifiable', 'verdict_status',
                                         'verdict', 'error')}}
    summary['latents'].append(entry)
    if 'label' not in line:
      print(f'{fid:<22} {concept:<8} {line.get("error", "not labeled")}')
      continue
    a = line['auroc']
    ref = '-' if a['reference'] is None else f'{a["reference"]:.2f}'
    descent = f'{line["descent_label"]!r} p {line["top5"][0]["p"]:.2f}'
    print(f'{fid:<22} {concept:<8} {line["label"]!r:<10} {descent:<19} {line["steps"]:5d}  '
          f'{a["found"]:5.2f} {ref:>5} {a["random_mean"]:6.2f} '
          f'{line["scores"]["detection"]["auroc"]:6.2f}  {line["verdict_status"]}')
    print(f'{"":<22} {path}: {explanation}')
  with open(os.path.join(args.out, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1, ensure_ascii=False)
  return 0


if __name__ == '__main__':
  sys.exit(main())
