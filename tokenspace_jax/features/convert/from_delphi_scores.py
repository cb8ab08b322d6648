"""delphi's scored examples to records: the examples its scorers showed, with activations.

delphi writes one file per latent and scorer, ``scores/{scorer}/{latent}.txt``, where
``{latent}`` is ``{hookpoint}_latent{index}`` (``/`` in the hookpoint written as ``--``) and the
content is a JSON array of its ``ClassifierOutput``::

  [{"str_tokens": [...], "activations": [...], "distance": 3, "activating": true,
    "prediction": true, "probability": 0.9, "correct": true}, ...]

``str_tokens`` are delphi's per-token decodings (``tokenizer.batch_decode``), so they are plain
text, except where one character spans tokens: each piece then decodes to U+FFFD, the text is
lost, and the record is skipped. Activating and non-activating examples alike become records;
the per-token activations, not the scorer's verdicts, say where the latent fires. A fuzzing
scorer shows an example more than once; it is kept once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from tokenspace_jax.features.convert import token_records as tr
from tokenspace_jax.features.convert.report import Conversion, Report
from tokenspace_jax.features.example import FeatureError

_LATENT = re.compile(r'(.+)_latent(\d+)')


def delphi_scores(paths: list[str] | str) -> Conversion:
  """Records of delphi score files (or folders of them, e.g. a run's ``scores/``)."""
  files = tr.expand(paths, ('.txt', '.json'))
  return Conversion('delphi-scores', lambda report: _produce(files, report))


def latent_of(stem: str) -> tuple[str, int] | None:
  """``(hookpoint, latent)`` of delphi's file name for a latent, or None."""
  m = _LATENT.fullmatch(stem.replace('--', '/'))
  return (m.group(1), int(m.group(2))) if m else None


def _produce(files: list[str], report: Report) -> Iterator[dict]:
  dedupe = tr.Deduplicator()
  firing: dict[str, bool] = {}
  for path in files:
    name = os.path.basename(path)
    stem = name[:-len('.txt')] if name.endswith('.txt') else os.path.splitext(name)[0]
    latent = latent_of(stem)
    if latent is None:
      report.skip('the file name is not delphi\'s "{hookpoint}_latent{index}.txt", so the '
                  'latent is unknown; keep the names delphi wrote.', record=path)
      continue
    hookpoint, index = latent
    fid = f'{hookpoint}_latent{index}'
    source = {'format': 'delphi', 'hookpoint': hookpoint, 'latent': index,
              'scorer': os.path.basename(os.path.dirname(os.path.abspath(path)))}
    try:
      examples = tr.load_json(tr.read_bytes(path), path)
      if not isinstance(examples, list):
        raise FeatureError(f'{path}: expected a JSON array of scored examples, got '
                           f'{type(examples).__name__}; is this a delphi score file?')
    except FeatureError as e:
      report.skip(str(e), fid, path)
      continue
    written = 0
    for i, ex in enumerate(examples):
      where = f'{path} [{i}]'
      try:
        if not isinstance(ex, dict):
          raise FeatureError(f'{where}: not a scored example ({type(ex).__name__}).')
        rec = tr.token_record(fid, tr.strings(ex.get('str_tokens'), 'str_tokens', where),
                              tr.numbers(ex.get('activations'), 'activations', where), where,
                              source=source, scheme='plain')
      except FeatureError as e:
        report.skip(str(e), fid, where)
        continue
      if not dedupe.is_new(rec):
        report.skip('shown again (the same tokens and activations as an earlier example).', fid,
                    where)
        continue
      written += 1
      firing[fid] = firing.get(fid, False) or not tr.fires(rec)
      yield rec
    if not written and examples:
      report.skip('no usable example in this file.', fid, path)
  for fid, has_negative in firing.items():
    if not has_negative:
      report.warn('every example fires (no non-activating ones were scored): the negatives are '
                  'the other tokens of those texts.', fid)
