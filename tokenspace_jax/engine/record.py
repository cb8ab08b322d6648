"""One record per label row: the final choice, the held-out scores, the verdict; and its views.

Every command reports through these records: ``result.json`` (a single run) is the record of
its one row, ``sweep.json`` the records of a feature's rows with which agree, and a line of the
batch job's ``labels.jsonl`` a feature's best row. The best row of a feature is the one whose
label scores best on the *training* split; the held-out split only reports.

For each feature the scorer runs once over every label its rows and baselines need (one batched
pass), with the same bootstrap resamples, so every row's verdict and interval is paired with the
same baselines.
"""

from __future__ import annotations

import collections

import numpy as np
from ml_collections import ConfigDict

from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.engine import scoring
from tokenspace_jax.engine.loop import NON_FINITE, SETTLED, STATUS_NAMES, STOPPED_EARLY, LoopResult
from tokenspace_jax.engine.pool import Pool, stratified_pick
from tokenspace_jax.engine.rows import RowSpec
from tokenspace_jax.engine.scoring import label_key

TOP = 10  # alternatives of the first position kept in a record


def baseline_labels(config: ConfigDict, tokenizer, pool: Pool, feature: int,
                    k: int) -> list[tuple]:
  """(ids, text, role) of what a found label is compared with: the human reference word (all
  of its tokens, whatever the slot's length) and ``eval.num_random`` random labels of ``k``
  tokens."""
  labels = []
  word = pool.features[feature].reference_word
  if word:
    if k > 1:
      ids = tokenizer(' ' + word.strip(), add_special_tokens=False)['input_ids']
      labels.append((list(ids), ' ' + word.strip(), 'reference'))
    else:
      ids, spelling = label_lib.reference_ids(tokenizer, pool.template.user, word)
      labels.append((ids[0] if len(ids) == 1 else ids, spelling, 'reference'))
  randoms = scoring.verdict_random_tokens(config, pool.allowed, tokenizer)
  for j in range(0, len(randoms) - k + 1, k):
    ids = randoms[j:j + k]
    labels.append((ids if k > 1 else ids[0], tokenizer.decode(ids), 'random'))
  return labels


def extra_candidates(config: ConfigDict, tokenizer, pool: Pool) -> list:
  """``choice.candidates`` as labels (an id, or the ids of a word of several tokens)."""
  out = []
  for word in filter(None, (w.strip() for w in config.choice.candidates.split(','))):
    ids, _ = label_lib.reference_ids(tokenizer, pool.template.user, word)
    out.append(ids[0] if len(ids) == 1 else ids)
  return out


def distinct(labels) -> list:
  """``labels`` without repeats (by their ids), in order of first appearance."""
  return list({label_key(c): c for c in labels}.values())


def final_choice(scorer: scoring.LabelScorer, candidates: dict[int, list],
                 chooser: scoring.Split, screen: int, keep: int,
                 seed: int) -> tuple[dict[tuple, float], dict[tuple, int]]:
  """Training AUROC of every row's candidates (its descent label first), and the examples each
  was scored on, by label ids: the finalists on all of ``chooser``, the others on the screen.

  Many of a row's candidates are far from its best (docs/method.md, "The final choice"), so
  with ``0 < screen < len(chooser)`` every candidate is first scored on ``screen`` of the
  chooser's examples (stratified), and only the ``keep`` best of each row, and its descent
  label, go on to the rest: by default about half the pairs of scoring every candidate on every
  example. A row's label is the best of its finalists.
  """
  everyone = distinct([c for cands in candidates.values() for c in cands])
  aurocs = lambda labels, split: dict(zip(map(label_key, labels),
                                          scorer.training_aurocs(labels, split), strict=True))
  n = len(chooser.slots)
  if not (0 < screen < n and keep > 0):
    return aurocs(everyone, chooser), {label_key(c): n for c in everyone}
  first = chooser.take(stratified_pick(chooser.targets, screen, seed))
  screened = aurocs(everyone, first)
  finalists = distinct([c for cands in candidates.values()
                        for c in [cands[0]] + sorted(cands, key=lambda c: -screened[label_key(c)]
                                                     )[:keep]])
  final = aurocs(finalists, chooser)  # the screen's margins are the scorer's: not run again
  return ({**screened, **final},
          {key: (n if key in final else len(first.slots)) for key in screened})


def runner_up(scorer: scoring.LabelScorer, chosen, finalists: list, train_auroc: dict,
              chooser: scoring.Split, config: ConfigDict, decode) -> dict | None:
  """The best finalist after the chosen label, and how far apart the two are on the choice's
  training examples: the paired bootstrap interval of chosen minus runner-up.

  A final choice ranks its finalists by their training AUROC, and equal AUROCs fall to the
  earlier candidate (the descent's more probable token): when the two are within noise the
  label is one of them by chance, which the record says (``views.summary`` prints it). Their
  margins are the choice's own, so nothing is run again.
  """
  others = [c for c in finalists if label_key(c) != label_key(chosen)]
  if not others:
    return None
  second = max(others, key=lambda c: train_auroc[label_key(c)])
  samples = scoring.bootstrap_aurocs(scorer.margins([chosen, second], chooser.slots),
                                     chooser.targets, config.eval.bootstrap, config.seed + 6)
  diff = samples[0] - samples[1]
  gap = float(train_auroc[label_key(chosen)] - train_auroc[label_key(second)])
  return {'token': decode(second), 'token_id': _label(second),
          'train_auroc': float(train_auroc[label_key(second)]), 'difference': gap,
          'difference_interval': scoring.interval(diff, config.eval.confidence)}


def _split(pool: Pool, idx: np.ndarray) -> scoring.Split:
  ex = [pool.examples[i] for i in idx]  # of one feature, whose windows are numbered apart
  return scoring.Split(slots=pool.slot_of[idx], targets=pool.targets[idx],
                       windows=np.array([e.window for e in ex]),
                       activations=np.array([e.activation for e in ex], np.float64))


def _label(ids):
  ids = [int(i) for i in np.atleast_1d(ids)]
  return ids[0] if len(ids) == 1 else ids


def score_rows(config: ConfigDict, tokenizer, scorer: scoring.LabelScorer, pool: Pool,
               specs: list[RowSpec], result: LoopResult, p: np.ndarray,
               trajectory: list[dict] | None = None) -> list[dict]:
  """The record of every row. ``p`` [N, K, V] is each row's final distribution."""
  status = result.status
  steps = np.asarray(result.state['rows']['step'])
  decode = lambda ids: tokenizer.decode([int(i) for i in np.atleast_1d(ids)])
  multi = p.shape[1] > 1
  records: list[dict | None] = [None] * len(specs)
  for f in range(len(pool.features)):
    rows = [r for r, s in enumerate(specs) if s.feature == f]
    failed = [r for r in rows if int(status[r]) == NON_FINITE]
    for r in failed:  # kept at their last good state, but not scored
      records[r] = _record(specs[r], r, pool, f, p, _label(p[r].argmax(-1)),
                           _label(p[r].argmax(-1)), decode, status, steps, trajectory,
                           pool.split(f, True), pool.split(f, False), None)
    rows = [r for r in rows if r not in failed]
    if not rows:
      continue
    train, held = pool.split(f, True), pool.split(f, False)
    chooser = train[stratified_pick(pool.targets[train], config.choice.examples,
                                    config.seed + 3)]
    # The thresholds are fitted on examples the choice scored (training examples both), so the
    # chosen label's calibration margins are the choice's, not run again.
    within = chooser if len(chooser) >= config.eval.calibration_examples else train
    calib = within[stratified_pick(pool.targets[within], config.eval.calibration_examples,
                                   config.seed + 2)]
    extra = extra_candidates(config, tokenizer, pool)
    choice_split = _split(pool, chooser)
    # Each row's candidates: its descent label first, then its top tokens, then the extras.
    candidates = {}
    for r in rows:
      own = [int(i) for i in p[r].argmax(-1)]
      cands = [_label(own)]
      if config.choice.top_k > 0:
        if multi:  # one position at a time takes one of its top alternatives
          for pos in range(p.shape[1]):
            for i in np.argsort(-p[r, pos])[:config.choice.top_k]:
              cands.append(own[:pos] + [int(i)] + own[pos + 1:])
        else:
          cands += [int(i) for i in np.argsort(-p[r, 0])[:config.choice.top_k]]
        cands += extra
      candidates[r] = distinct(cands)
    train_auroc, scored_on = final_choice(
        scorer, {r: candidates[r] for r in rows}, choice_split, config.choice.screen,
        config.choice.keep, config.seed + 5)
    finalists = {r: [c for c in candidates[r] if scored_on[label_key(c)] == len(chooser)]
                 for r in rows}
    chosen = {r: (max(finalists[r], key=lambda c: train_auroc[label_key(c)])
                  if config.choice.top_k > 0 else candidates[r][0]) for r in rows}
    baselines = baseline_labels(config, tokenizer, pool, f, p.shape[1])
    labels = distinct([c for r in rows for c in (chosen[r], candidates[r][0])])
    scored = ([(c, decode(c), 'found') for c in labels] + baselines)
    scores, samples = scorer.score(
        scored, _split(pool, calib), _split(pool, held), resamples=config.eval.bootstrap,
        confidence=config.eval.confidence, seed=config.seed + 4)
    by_key = {label_key(s.token_id): i for i, s in enumerate(scores[:len(labels)])}
    base_idx = list(range(len(labels), len(scores)))
    positives = int(pool.targets[held].sum())
    for r in rows:
      spec = specs[r]
      found, own = by_key[label_key(chosen[r])], by_key[label_key(candidates[r][0])]
      row_scores = [scores[found]] + [scores[i] for i in base_idx]
      verdict = scoring.verdict(row_scores, samples[[found] + base_idx], positives=positives,
                                negatives=int(len(held) - positives),
                                confidence=config.eval.confidence)
      descent_score = scores[own].as_dict() | {'role': 'descent'}
      record = _record(spec, r, pool, f, p, chosen[r], candidates[r][0], decode, status, steps,
                       trajectory, train, held, positives)
      record['choice'] = {
          'examples': int(len(chooser)),
          'changed': label_key(chosen[r]) != label_key(candidates[r][0]),
          'candidates': [{'token': decode(c), 'token_id': _label(c),
                          'train_auroc': train_auroc.get(label_key(c)),
                          'examples': scored_on[label_key(c)]} for c in candidates[r]],
          'runner_up': runner_up(scorer, chosen[r], finalists[r], train_auroc, choice_split,
                                 config, decode)}
      record['heldout']['scores'] = [s.as_dict() for s in row_scores]
      record['heldout']['descent'] = descent_score
      record['heldout']['verdict'] = verdict
      record['identifiable'] = verdict['identifiable']
      record['verdict'] = verdict['message']
      record['train_auroc'] = train_auroc[label_key(chosen[r])]
      records[r] = record
  return records


def _record(spec, r, pool, f, p, chosen, own, decode, status, steps, trajectory, train, held,
            positives) -> dict:
  feature = pool.features[f]
  probability = float(np.prod([p[r, k, i] for k, i in enumerate(np.atleast_1d(chosen))])
                      ) if len(np.atleast_1d(chosen)) == p.shape[1] else None
  top = [{'token': decode(i), 'id': int(i), 'p': float(p[r, 0, i])}
         for i in np.argsort(-p[r, 0])[:TOP]]
  rows_of = [x for x in (trajectory or []) if x.get('row', 0) == r]
  p90 = next((x['step'] for x in rows_of if min(x['label_p']) >= 0.9), None)
  last = rows_of[-1] if rows_of else {}
  record = {
      'feature': feature.name, 'row': r, 'restart': spec.restart,
      **spec.hyperparameters(),
      'label': decode(chosen), 'token_id': _label(chosen), 'probability': probability,
      'descent_label': decode(own), 'descent_token_id': _label(own),
      'descent_probability': float(p[r].max(-1).min()),
      'top10': top,
      'positions': ([[{'token': decode(i), 'id': int(i), 'p': float(p[r, k, i])}
                      for i in np.argsort(-p[r, k])[:5]] for k in range(p.shape[1])]
                    if p.shape[1] > 1 else None),
      'status': STATUS_NAMES[int(status[r])], 'steps': int(steps[r]),
      'stopped_early': int(status[r]) in (STOPPED_EARLY, SETTLED), 'steps_to_p90': p90,
      'final_losses': {k: last.get(k) for k in ('loss', 'answer_ce', 'entropy', 'kl',
                                                'answer_bias')},
      'heldout': {'examples': int(len(held)), 'positives': positives},
      'train': {'examples': int(len(train)),
                'positives': int(pool.targets[train].sum())},
      'reference_word': feature.reference_word,
  }
  if pool.notes:  # what the judge read off this feature's texts (prompt.note), most common first
    texts = {pool.examples[i].text for i in (*train, *held)}
    record['notes'] = dict(collections.Counter(pool.notes[t] for t in texts).most_common())
  if int(status[r]) == NON_FINITE:
    record['error'] = ('The loss became non-finite; the row stopped at its last good state '
                       f'(step {int(steps[r])}). Rerun with a lower optim.lr in a new --workdir, '
                       'or check the model weights and dtype (bfloat16 overflows more easily '
                       'than float32).')
  return record


def best_row(records: list[dict]) -> dict:
  """The row whose label scores best on the training split (ties: the first); rows that
  failed only when every row did."""
  ok = [x for x in records if 'error' not in x] or records
  return max(ok, key=lambda x: (x['train_auroc'] if x.get('train_auroc') is not None
                                else -np.inf, -x['row']))
