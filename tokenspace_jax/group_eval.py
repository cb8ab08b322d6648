"""One feature's line of labels.jsonl: its found token, scored on held-out examples of the pool.

The scoring is a single run's (``labeling._finish``): the found token, the feature's reference
word and a few random tokens are scored alike, with thresholds fitted on training examples, and
``scoring.verdict`` says whether the label matters at all. One scorer serves every group (its
pool is swapped in), so its jitted margins are compiled once for the job.
"""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.classifier import prompts
from tokenspace_jax.engine import scoring
from tokenspace_jax.feature_group import FeatureGroup
from tokenspace_jax.labeling import _stratified_pick

TOP_K = 5


def reference_token(tokenizer, template: prompts.PromptTemplate, word: str):
  """(id, spelling) of ``word`` as the slot expects it first, or None if no spelling is one
  token: with a leading space after "Concept:", bare after a quote."""
  spaced = not template.user.split('{concept}')[0].endswith(('"', "'"))
  variants = [' ' + word.strip(), word.strip()]
  for variant in (variants if spaced else variants[::-1]):
    try:
      return label_lib.token_id_for_word(tokenizer, variant), variant
    except label_lib.LabelError:
      continue
  return None


def feature_line(config: ConfigDict, tokenizer, template: prompts.PromptTemplate,
                 scorer: scoring.LabelScorer, group: FeatureGroup, row: int, label: dict,
                 random_ids: list[int]) -> dict:
  """The result of row ``row`` of ``group``, whose final label is ``label`` ([1, V] logits)."""
  feature = group.features[row]
  p = np.asarray(label_lib.probabilities(label, group.data.allowed, config.label.temperature))[0]
  top = label_lib.top_tokens(p, tokenizer, TOP_K)
  found_id, found_token, found_p = top[0]
  train, heldout = group.train_idx[row], group.heldout_idx[row]
  calib = train[_stratified_pick(group.targets[train], config.eval.calibration_examples,
                                 config.seed + 2)]
  candidates = [(found_id, found_token, 'found')]
  ref = reference_token(tokenizer, template, feature.reference_word) if (
      feature.reference_word) else None
  if ref is not None:
    candidates.append((*ref, 'reference'))
  candidates += [(i, tokenizer.decode([i]), 'random') for i in random_ids]
  scores = [scorer.score(i, s, role, calib, group.targets[calib], heldout, group.targets[heldout])
            for i, s, role in candidates]
  verdict = scoring.verdict(scores)
  by_role = lambda role: [s.auroc for s in scores if s.role == role]
  return {
      'feature_id': group.feature_ids[row], 'label': found_token, 'token_id': found_id,
      'probability': found_p, 'top5': [{'token': s, 'id': i, 'p': q} for i, s, q in top],
      'auroc': {'found': scores[0].auroc,
                'reference': by_role('reference')[0] if ref is not None else None,
                'random_mean': verdict['random_auroc_mean']},
      'identifiable': verdict['identifiable'], 'verdict': verdict['message'],
      'reference_word': feature.reference_word,
      'heldout': {'examples': int(len(heldout)), 'positives': int(group.targets[heldout].sum()),
                  'scores': [s.as_dict() for s in scores]},
      'train': {'examples': int(len(train)), 'positives': int(group.targets[train].sum())},
  }
