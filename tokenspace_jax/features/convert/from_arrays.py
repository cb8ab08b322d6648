"""Records straight from arrays: an SAE's latents on a batch of texts (SAELens, or any SAE).

SAELens writes no file to import; the activations are ``sae.encode(cache[hook])``, shaped
``[batch, pos, d_sae]``, for the token ids (or the ``model.to_str_tokens`` strings) that went in.
:func:`records_from_arrays` makes one record per row and latent, so rows where a latent is
silent are its negatives. Token ids need the tokenizer of the model that produced them; token
strings go through :mod:`tokenspace_jax.features.token_markers` like any dashboard's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from tokenspace_jax.features.convert import token_records as tr
from tokenspace_jax.features.convert.report import Conversion, Report
from tokenspace_jax.features.convert.token_ids import IdDecoder
from tokenspace_jax.features.example import FeatureError


def _numpy(x: Any) -> np.ndarray:
  if hasattr(x, 'detach'):  # a torch tensor, possibly on an accelerator
    x = x.detach().float().cpu().numpy()
  return np.asarray(x)


def records_from_arrays(tokens: Any, activations: Any, *, latents: Iterable[int] | None = None,
                        tokenizer: Any = None, labeling_tokenizer: Any = None,
                        source: dict | None = None) -> Conversion:
  """Records of ``activations[b, p, latent]`` on ``tokens[b][p]`` for each latent.

  ``tokens``: token ids ``[batch, pos]`` (with the model's ``tokenizer``) or lists of token
  strings. ``latents`` defaults to every latent that fires somewhere. ``source`` (e.g.
  ``{"release": ..., "sae_id": ..., "hookpoint": ...}``) goes into each record's source; with a
  ``hookpoint`` the feature ids are ``"{hookpoint}_latent{i}"``, otherwise the latent index.
  """
  acts = _numpy(activations)
  if acts.ndim != 3:
    raise FeatureError(f'activations must be [batch, pos, d_sae], got shape {acts.shape}; pass '
                       'sae.encode(cache[hook]) for a batch of texts.')
  if isinstance(tokens, Sequence) and tokens and isinstance(tokens[0], Sequence) and tokens[0] \
      and isinstance(tokens[0][0], str):
    rows, decoder = [list(r) for r in tokens], None
  else:
    ids = _numpy(tokens)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise FeatureError(f'tokens must be token ids [batch, pos] or lists of strings, got '
                         f'{ids.dtype} {ids.shape}.')
    if tokenizer is None:
      raise FeatureError('token ids need the tokenizer of the model that made them; pass '
                         'tokenizer=model.tokenizer (or the token strings instead).')
    rows, decoder = ids.tolist(), IdDecoder(tokenizer, labeling_tokenizer)
  shape = (len(rows), max((len(r) for r in rows), default=0))
  if shape[0] != acts.shape[0] or any(len(r) != acts.shape[1] for r in rows):
    raise FeatureError(f'tokens ({shape[0]} rows of {shape[1]}) and activations '
                       f'{acts.shape[:2]} disagree; pass the tokens the activations are of.')
  if not np.isfinite(acts).all():
    raise FeatureError('activations hold NaN or inf; check the SAE and model dtypes.')
  if latents is None:
    latents = np.flatnonzero((acts > 0).any(axis=(0, 1))).tolist()
  latents = [int(i) for i in latents]
  for i in latents:
    if not 0 <= i < acts.shape[2]:
      raise FeatureError(f'latent {i} is outside [0, {acts.shape[2]}) (d_sae).')
  extra = dict(source or {})

  def produce(report: Report) -> Iterator[dict]:
    for latent in latents:
      hook = extra.get('hookpoint')
      fid = f'{hook}_latent{latent}' if hook else latent
      src = {'format': 'saelens', **extra, 'latent': latent}
      column = acts[:, :, latent]
      out = []
      for b, row in enumerate(rows):
        where = f'row {b} of latent {latent}'
        values = [float(a) for a in column[b]]
        try:
          if decoder is None:
            rec = tr.token_record(fid, tr.strings(row, 'tokens', where), values, where,
                                  source=src)
          else:
            rec = {'feature_id': fid, **decoder.fields(row, values, where), 'source': src}
        except FeatureError as e:
          report.skip(str(e), fid, where)
          continue
        out.append(rec)
      if not any(tr.fires(r) for r in out):
        report.skip('never fires on these rows (outside special tokens).', fid)
        continue
      if all(tr.fires(r) for r in out):
        report.warn('fires in every row: the negatives are the other tokens of those rows.', fid)
      yield from out

  return Conversion('saelens', produce)
