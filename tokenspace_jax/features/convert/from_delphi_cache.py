"""delphi's latent cache to records, latent by latent, in one pass over each split file.

delphi (EleutherAI) caches an SAE's activations on a token dataset as
``latents/{hookpoint}/{start}_{end}.safetensors`` (latents ``start``..``end`` inclusive), each
holding only the nonzero activations::

  locations    [N, 3] uint16/uint32  (row of tokens, position, latent - start)
  activations  [N]    float16
  tokens       [n_rows, ctx] ids of the SAE model's tokenizer (the same in every split)

with ``config.json`` beside them naming ``model_name``. Like delphi's own example constructor,
each row is cut into windows of ``window`` tokens (delphi's ``example_ctx_len``, 32); a
latent's windows where it fires are its positives (at most ``max_positives``, spread evenly
over the range of their peak activations, top included), and ``negatives`` windows where it
never fires, drawn with a per-latent seed, are its negatives. Special tokens (BOS) are dropped.

Memory stays bounded by one split file: its locations are sorted by latent once (about 30 bytes
per nonzero activation), each latent's rows are scattered into dense activations for its own
selected windows only, and the tokens are read through a memory map, row by row.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from tokenspace_jax.features.convert.report import Conversion, Report
from tokenspace_jax.features.convert.token_ids import IdDecoder, load_tokenizer_for
from tokenspace_jax.features.example import FeatureError, FeatureFileNotFoundError

DEFAULT_WINDOW = 32  # delphi's ConstructorConfig.example_ctx_len
DEFAULT_NEGATIVES = 50  # delphi's ConstructorConfig.n_non_activating
DEFAULT_MAX_POSITIVES = 100

_SPLIT = re.compile(r'(\d+)_(\d+)\.safetensors')


def delphi(paths: list[str] | str, *, tokenizer: Any = None, labeling_tokenizer: Any = None,
           window: int = DEFAULT_WINDOW, negatives: int = DEFAULT_NEGATIVES,
           max_positives: int = DEFAULT_MAX_POSITIVES, latents: Iterable[int] | None = None,
           seed: int = 0) -> Conversion:
  """Records of a delphi cache: ``paths`` are its ``latents/`` folder, hookpoint folders, or
  split files.

  ``tokenizer`` is the SAE model's (a tokenizer, a path, ``'default'``; default: the
  ``model_name`` of ``config.json``, if it loads offline). ``labeling_tokenizer``: when it has
  the same vocabulary, records keep the ids. ``latents`` restricts the import to those indices.
  """
  for name, value, low in (('window', window, 1), ('negatives', negatives, 0),
                           ('max_positives', max_positives, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise FeatureError(f'{name} must be an integer >= {low}, got {value!r}.')
  hookpoints = _hookpoint_files(paths)
  wanted = None if latents is None else {int(i) for i in latents}

  def produce(report: Report) -> Iterator[dict]:
    labeling = _labeling(labeling_tokenizer)
    decoders: dict = {}  # one per tokenizer, however many hookpoints share it
    for folder, files in hookpoints:
      model = _model_name(folder, tokenizer is None)
      key = model if tokenizer is None else None  # a given tokenizer serves every hookpoint
      if key not in decoders:
        decoders[key] = IdDecoder(load_tokenizer_for(tokenizer, model, os.path.join(
            folder, 'config.json')), labeling)
      decoder = decoders[key]
      found: set[int] = set()
      for path in files:
        yield from _split_records(path, os.path.basename(folder), model, decoder, window,
                                  negatives, max_positives, wanted, seed, found, report)
      for latent in sorted((wanted or set()) - found):
        report.skip('the latent never fires in this cache.',
                    f'{os.path.basename(folder)}_latent{latent}', folder)

  return Conversion('delphi', produce)


def _labeling(spec: Any) -> Any:
  if spec is None or not isinstance(spec, (str, os.PathLike)):
    return spec
  return load_tokenizer_for(spec, None, 'labeling tokenizer')


def _hookpoint_files(paths) -> list[tuple[str, list[str]]]:
  """``(hookpoint folder, its split files in latent order)`` for each hookpoint given."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  by_folder: dict[str, list[str]] = {}
  for p in map(str, paths):
    if os.path.isfile(p):
      if not _SPLIT.fullmatch(os.path.basename(p)):
        raise FeatureError(f'{p}: not a delphi split file (named {{start}}_{{end}}.safetensors).')
      by_folder.setdefault(os.path.dirname(os.path.abspath(p)), []).append(p)
    elif os.path.isdir(p):
      own = [os.path.join(p, f) for f in os.listdir(p) if _SPLIT.fullmatch(f)]
      if own:
        by_folder.setdefault(os.path.abspath(p), []).extend(own)
        continue
      for sub in sorted(os.listdir(p)):
        d = os.path.join(p, sub)
        files = [os.path.join(d, f) for f in os.listdir(d)] if os.path.isdir(d) else []
        files = [f for f in files if _SPLIT.fullmatch(os.path.basename(f))]
        if files:
          by_folder.setdefault(os.path.abspath(d), []).extend(files)
      if not any(k.startswith(os.path.abspath(p)) for k in by_folder):
        raise FeatureError(f'{p}: no delphi cache here (no {{start}}_{{end}}.safetensors files '
                           'in it or in its hookpoint folders); pass the latents/ folder.')
    else:
      raise FeatureFileNotFoundError(f'{p}: no such file or folder; check the path.')
  return [(folder, sorted(set(files), key=lambda f: int(
      _SPLIT.fullmatch(os.path.basename(f)).group(1)))) for folder, files in by_folder.items()]


def _model_name(folder: str, required: bool) -> str | None:
  path = os.path.join(folder, 'config.json')
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except FileNotFoundError:
    if required:
      raise FeatureError(f'{path}: missing (delphi writes it beside the cache), so the model '
                         'and its tokenizer are unknown; pass --tokenizer=PATH.') from None
    return None
  except (OSError, ValueError) as e:
    raise FeatureError(f'{path}: unreadable ({e}); pass --tokenizer=PATH to go without it.'
                       ) from None
  name = config.get('model_name') if isinstance(config, dict) else None
  return name if isinstance(name, str) else None


def _split_arrays(path: str):
  from tokenspace_jax.models.loading.errors import WeightFormatError
  from tokenspace_jax.models.loading.safetensors_source import SafetensorsFile
  try:
    st = SafetensorsFile(path)
  except WeightFormatError as e:
    raise FeatureError(str(e)) from None
  missing = {'locations', 'activations', 'tokens'} - set(st.names())
  if missing:
    hint = (' (delphi saved it without tokens; cache again with save_tokens=True)'
            if missing == {'tokens'} else '')
    raise FeatureError(f'{path}: no {", ".join(sorted(missing))} tensor{hint}; is this a delphi '
                       'latent cache split?')
  locations, acts, tokens = st.get('locations'), st.get('activations'), st.get('tokens')
  if (locations.ndim != 2 or locations.shape[1] != 3 or acts.shape != (locations.shape[0],)
      or tokens.ndim != 2 or not np.issubdtype(locations.dtype, np.integer)
      or not np.issubdtype(tokens.dtype, np.integer)):
    raise FeatureError(f'{path}: tensors of unexpected shapes (locations {locations.shape} '
                       f'{locations.dtype}, activations {acts.shape}, tokens {tokens.shape}); '
                       'expected [N, 3] integers, [N] and [rows, ctx] integers.')
  return locations, acts, tokens


def _split_records(path: str, hookpoint: str, model: str | None, decoder: IdDecoder,
                   window: int, n_negatives: int, max_positives: int, wanted: set | None,
                   seed: int, found: set, report: Report) -> Iterator[dict]:
  start = int(_SPLIT.fullmatch(os.path.basename(path)).group(1))
  try:
    locations, acts, tokens = _split_arrays(path)
  except FeatureError as e:
    report.skip(str(e), record=path)
    return
  n_rows, ctx = tokens.shape
  per_row = -(-ctx // window)
  rel = np.asarray(locations[:, 2], dtype=np.int64)
  if not len(rel):
    return
  order = np.argsort(rel, kind='stable')
  rel = rel[order]
  edges = np.concatenate([[0], np.flatnonzero(np.diff(rel)) + 1, [len(rel)]])
  for a, b in zip(edges[:-1], edges[1:], strict=True):
    latent = start + int(rel[a])
    group = order[a:b]
    if wanted is not None and latent not in wanted:
      continue
    found.add(latent)
    fid = f'{hookpoint}_latent{latent}'
    source = {'format': 'delphi', 'hookpoint': hookpoint, 'latent': latent, 'model': model}
    rows = np.asarray(locations[group, 0], dtype=np.int64)
    pos = np.asarray(locations[group, 1], dtype=np.int64)
    if rows.max() >= n_rows or pos.max() >= ctx:
      report.skip(f'{path}: locations outside the tokens tensor {tokens.shape}; the split is '
                  'corrupt.', fid, path)
      continue
    yield from _latent_records(fid, source, rows, pos, np.asarray(acts[group], np.float32),
                               tokens, window, per_row, n_negatives, max_positives,
                               np.random.default_rng([seed, latent]), decoder, path, report)


def _latent_records(fid, source, rows, pos, values, tokens, window, per_row, n_negatives,
                    max_positives, rng, decoder: IdDecoder, path: str,
                    report: Report) -> Iterator[dict]:
  n_rows, ctx = tokens.shape
  flat = rows * per_row + pos // window
  windows, inverse = np.unique(flat, return_inverse=True)
  peak = np.full(len(windows), -np.inf, np.float32)
  np.maximum.at(peak, inverse, values)
  chosen = np.arange(len(windows))
  if len(windows) > max_positives:  # Evenly over the range of peaks, the top one included.
    by_peak = np.argsort(-peak, kind='stable')
    chosen = np.sort(by_peak[np.unique(np.linspace(0, len(windows) - 1, max_positives).round()
                                       .astype(np.int64))])
  slot = np.full(len(windows), -1, np.int64)  # window -> its row of dense, if chosen
  slot[chosen] = np.arange(len(chosen))
  keep = slot[inverse] >= 0
  dense = np.zeros((len(chosen), window), np.float32)
  dense[slot[inverse[keep]], pos[keep] % window] = values[keep]

  total = n_rows * per_row
  free = total - len(windows)
  if free <= 0:
    negatives = np.zeros(0, np.int64)
  elif free <= 4 * n_negatives:
    negatives = np.setdiff1d(np.arange(total), windows)
    negatives = np.sort(rng.permutation(negatives)[:n_negatives])
  else:
    draw = rng.choice(total, size=min(total, 2 * n_negatives + len(windows)), replace=False)
    negatives = np.sort(draw[~np.isin(draw, windows)][:n_negatives])

  out, fires = [], False
  items = [(int(windows[k]), dense[j]) for j, k in enumerate(chosen)]
  items += [(int(w), None) for w in negatives]
  for w, act in items:
    row, col = divmod(w, per_row)
    ids = tokens[row, col * window:min((col + 1) * window, ctx)].tolist()
    where = f'{path} row {row} tokens {col * window}-{col * window + len(ids) - 1}'
    acts = act[:len(ids)].tolist() if act is not None else [0.0] * len(ids)
    try:
      rec = {'feature_id': fid, **decoder.fields(ids, acts, where), 'source': source}
    except FeatureError as e:
      report.skip(str(e), fid, where)
      continue
    fires = fires or any(a > 0 for a in rec['activations'])
    out.append(rec)
  if not fires:
    report.skip('fires only on special tokens (BOS) or in windows that could not be decoded, so '
                'no record shows it firing.', fid, path)
    return
  if len(negatives) < n_negatives:
    report.warn(f'only {len(negatives)} windows where the latent does not fire (of '
                f'{n_negatives} asked for): it fires in most of the cache.', fid)
  yield from out
