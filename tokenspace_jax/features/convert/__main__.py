"""The importers' command line; see :mod:`tokenspace_jax.features.convert`.

    python -m tokenspace_jax.features.convert --from=delphi results/run/latents \\
        --tokenizer=default --out=records.jsonl

Bad input is one line on stderr (exit status 2); what was skipped is summarised on stdout, all
of it in ``--report=FILE`` (JSON) when asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tokenspace_jax.features.convert import FORMATS, write_records
from tokenspace_jax.features.convert import from_delphi_cache as dc
from tokenspace_jax.features.example import FeatureError


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, not the usage block
    self.exit(2, f'error: {message} (see --help)\n')


def _latents(spec: str) -> list[int]:
  out = []
  try:
    for part in spec.split(','):
      lo, _, hi = part.strip().partition('-')
      out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
  except ValueError:
    raise argparse.ArgumentTypeError(f'{spec!r} is not a list of latents like 0-99,512') from None
  return out


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m tokenspace_jax.features.convert',
              description='Convert SAE-feature data of other tools into activation records.')
  p.add_argument('--from', dest='fmt', required=True, choices=sorted(FORMATS),
                 help='the format of the inputs')
  p.add_argument('inputs', nargs='+', metavar='IN', help='input files or folders')
  p.add_argument('--out', required=True, help='the records file to write (JSON Lines)')
  p.add_argument('--report', help='also write the full report (skips, warnings) as JSON here')
  d = p.add_argument_group('delphi cache')
  d.add_argument('--tokenizer', help='the SAE model\'s tokenizer: an HF folder, a .gguf file or '
                 '"default"; default: config.json\'s model_name, if it loads offline')
  d.add_argument('--labeling_tokenizer', help='the labeling model\'s tokenizer (path or '
                 '"default"): when it is the same, records keep the token ids')
  d.add_argument('--window', type=int, default=dc.DEFAULT_WINDOW, help='tokens per window')
  d.add_argument('--negatives', type=int, default=dc.DEFAULT_NEGATIVES,
                 help='windows where the latent is silent, per latent')
  d.add_argument('--max_positives', type=int, default=dc.DEFAULT_MAX_POSITIVES,
                 help='windows where the latent fires, at most, per latent')
  d.add_argument('--latents', type=_latents, help='only these latents, e.g. 0-99,512')
  d.add_argument('--seed', type=int, default=0, help='for the choice of negative windows')
  return p


def main(argv: list[str] | None = None) -> int:
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # --help, or the one line of _Parser.error
    return int(e.code or 0)
  delphi_only = {'tokenizer': args.tokenizer, 'labeling_tokenizer': args.labeling_tokenizer,
                 'latents': args.latents}
  try:
    if args.fmt == 'delphi':
      conversion = FORMATS['delphi'](
          args.inputs, tokenizer=args.tokenizer, labeling_tokenizer=args.labeling_tokenizer,
          window=args.window, negatives=args.negatives, max_positives=args.max_positives,
          latents=args.latents, seed=args.seed)
    else:
      given = [f'--{k}' for k, v in delphi_only.items() if v is not None]
      if given:
        raise FeatureError(f'{", ".join(given)} only apply to --from=delphi.')
      conversion = FORMATS[args.fmt](args.inputs)
    report = write_records(conversion, args.out)
  except FeatureError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(report.summary())
  if report.records:
    print(f'Wrote {args.out}.')
  if args.report:
    with open(args.report, 'w', encoding='utf-8') as f:
      json.dump(report.as_dict(), f, ensure_ascii=False, indent=1)
  if not report.records:
    os.remove(args.out)
    print('error: no records were written; see the skips above.', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
