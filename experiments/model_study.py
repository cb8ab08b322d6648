"""Which model and prompt can label the four built-in features: identifiability, then descent.

    python experiments/model_study.py identifiability [--models M,M] [--prompts P,P] \\
        [--features F,F] [--words W,W] [--arg contrast.labels=0] [--out workdirs/study]
    python experiments/model_study.py descent --models M --features F [--arg quick,...]
    python experiments/model_study.py table [--out workdirs/study]

``identifiability`` scores fixed labels in the concept slot with the engine's own scorer, on the
*training* split of each built-in feature (the held-out split stays for the final verdicts):
the feature's reference word, a few other plausible words, and ``--random`` random word-like
tokens. The figure to optimise is the reference AUROC minus the random mean, with its paired
bootstrap interval: a classifier whose answer does not depend on the label cannot be labeled
through, whatever the descent does. Each label's AUROC is also kept against the hard negatives
alone and against the ordinary ones alone (``auroc_against``): which negatives it loses to.

``descent`` runs ``tokenspace_jax.main`` on ``configs/<feature>.py`` with the model and prompt
given, into ``OUT/<model>/<prompt>/<feature>``, and ``table`` prints both tables for
docs/results.md. Every result is a JSON file under OUT, so the tables can be rebuilt at any time;
one that exists is not recomputed, so give each setting (``--arg``) its own ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = ('smollm2-135m', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b')
FEATURES = ('chinese', 'animal', 'mammal', 'number')
# Plausible named labels beside the reference word (scored, not used by descent).
OTHER_WORDS = {'chinese': ('中文', 'Chinese language', 'Japanese'),
               'animal': ('creature', 'animals'),
               'mammal': ('animal', 'mammals'),
               'number': ('numeral', 'digit')}


# Worked examples of a language concept whose negatives are a close language, the same word in
# both where the languages share it (as the chinese feature's Japanese hard negatives do): the
# concept names that exact language, decided by the text, not by the script or the spelling.
CLOSE_LANGUAGE_SHOTS = (('Het huis is groot en oud.', 'huis', 'Dutch', True),
                        ('Das Haus ist groß und alt.', 'Haus', 'Dutch', False),
                        ('Ela vive em Lisboa.', 'vive', 'Portuguese', True),
                        ('Ella vive en Sevilla.', 'vive', 'Portuguese', False))


USAGE_SYSTEM = ('Answer Yes or No. Judge the word as it is used in its text: by what it means '
                'there, and by the language that text is written in, not by its spelling alone.')


def candidate_prompts() -> dict:
  from tokenspace_jax import config_defaults as d

  with_shots = lambda extra: tuple(dict(text=t, word=w, concept=c, answer=a)
                                   for t, w, c, a in d.FEW_SHOT_EXAMPLES + extra)
  # The few-shot prompt with worked examples of a language concept added (a word written in
  # French, or not), since "is an instance of the concept" reads oddly for a feature that fires
  # on the words of a language.
  shots, close = with_shots(d.LANGUAGE_EXAMPLES), with_shots(CLOSE_LANGUAGE_SHOTS)
  matches = 'Decide whether the word, as used in the text, matches the concept.'
  return {**d.PROMPTS,
          'fewshot_close': dict(d.FEWSHOT_PROMPT, few_shot=close),
          'fewshot_close_chat': dict(d.FEWSHOT_CHAT_PROMPT, few_shot=close),
          'fewshot_lang': dict(d.FEWSHOT_PROMPT, few_shot=shots),
          'fewshot_lang_chat': dict(d.FEWSHOT_CHAT_PROMPT, few_shot=shots),
          'fewshot_lang_match_chat': dict(d.FEWSHOT_CHAT_PROMPT, few_shot=shots, system=matches),
          # question_chat with the close-language pairs after its own language examples.
          'question_close_chat': dict(d.QUESTION_CHAT_PROMPT, few_shot=with_shots(
              d.LANGUAGE_EXAMPLES + CLOSE_LANGUAGE_SHOTS)),
          # question_chat told to judge the word in its text, language included: asked about a
          # bare word, Qwen2.5-Coder-1.5B calls Japanese 東京 "a Chinese word" (it is written in
          # Chinese characters) though it names the text's language right.
          'question_usage_chat': dict(d.QUESTION_CHAT_PROMPT, system=USAGE_SYSTEM),
          'question_usage_close_chat': dict(d.QUESTION_CHAT_PROMPT, system=USAGE_SYSTEM,
                                            few_shot=with_shots(d.LANGUAGE_EXAMPLES
                                                                + CLOSE_LANGUAGE_SHOTS)),
          # Asked about the text's language rather than the word's: the 1.5B model names a
          # text's language right where it calls any word in Chinese characters Chinese.
          'text_language_chat': dict(d.QUESTION_CHAT_PROMPT, few_shot=(), user=(
              'Text: {text}\nThe word "{word}" is part of this text. Is the text written in '
              '{concept}?')),
          'question_text_chat': dict(d.QUESTION_CHAT_PROMPT, user=(
              'Text: {text}\nIn this text (mind the language it is written in), is the word '
              '"{word}" described by the concept {concept}?'))}


def config_for(feature: str, arg: str = '', **changes):
  spec = importlib.util.spec_from_file_location(feature, os.path.join(ROOT, 'configs',
                                                                      f'{feature}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from tokenspace_jax import config_defaults

  c = module.get_config(arg or None)
  c.progress = False
  return config_defaults.override(c, changes)


def identifiability(lm, model: str, prompt: str, feature: str, randoms: int, train: int,
                    resamples: int = 1000, arg: str = '', words: tuple = ()) -> dict:
  """Training-split AUROCs of the reference, other words (OTHER_WORDS, then ``words``) and
  random tokens, with intervals."""
  from ml_collections import ConfigDict

  from tokenspace_jax.classifier import label as label_lib
  from tokenspace_jax.engine import scoring
  from tokenspace_jax.engine.pool import build_pool
  from tokenspace_jax.features.from_config import load_feature

  config = config_for(feature, ','.join(filter(None, [f'model={model}', arg])),
                      **{'feature.max_train': train, 'feature.max_heldout': 16})
  config.prompt = ConfigDict(candidate_prompts()[prompt])
  start = time.perf_counter()
  f = load_feature(config.feature, lm.tokenizer, lm.config.vocab_size)
  pool = build_pool(config, lm, [f])
  tok = lm.tokenizer
  named = [(w, 'reference' if i == 0 else 'other')
           for i, w in enumerate((f.reference_word, *OTHER_WORDS[feature], *words))]
  labels = []
  for word, role in named:
    ids, spelling = label_lib.reference_ids(tok, pool.template.user, word)
    labels.append((ids, spelling, role))
  for i in scoring.random_label_tokens(pool.allowed, tok, randoms, seed=0):
    labels.append(([i], tok.decode([i]), 'random'))
  scorer = scoring.LabelScorer(lm.model, lm.params, pool.caches, pool.tail_ids,
                               pool.answer_ids, config.loss.answer == 'full',
                               config.eval.batch_size, known=pool.known_margins)
  idx = pool.split(0, True)
  margins = scorer.margins([x[0] for x in labels], pool.slot_of[idx])
  targets = pool.targets[idx]
  aurocs = np.array([scoring.auroc(m, targets) for m in margins])
  samples = scoring.bootstrap_aurocs(margins, targets, resamples, seed=0)
  random = [i for i, x in enumerate(labels) if x[2] == 'random']
  dependence = samples[0] - scoring.random_means(samples[random])
  # Against each kind of negative alone: where a label's AUROC is won or lost.
  hard = np.array([pool.examples[i].hard_negative for i in idx])
  against = {kind: (targets == 1) | ((targets == 0) & (hard == is_hard))
             for kind, is_hard in (('hard', True), ('ordinary', False))}
  versus = lambda m: {kind: (float(scoring.auroc(m[sel], targets[sel]))
                             if (sel & (targets == 0)).any() else None)
                      for kind, sel in against.items()}
  by_kind = [versus(m) for m in margins]
  return {'model': model, 'prompt': prompt, 'feature': feature,
          'contrast_labels': int(config.contrast.labels), 'examples': int(len(idx)),
          'positives': int(targets.sum()),
          'labels': [{'token': s, 'token_ids': [int(t) for t in ids], 'role': role,
                      'auroc': float(a), 'interval': scoring.interval(samples[i], 0.95),
                      'auroc_against': by_kind[i]}
                     for i, ((ids, s, role), a) in enumerate(zip(labels, aurocs, strict=True))],
          'random_mean': float(aurocs[random].mean()),
          'random_mean_against': {k: float(np.mean([np.nan if by_kind[i][k] is None
                                                    else by_kind[i][k] for i in random]))
                                  for k in against},
          'identifiability': float(aurocs[0] - aurocs[random].mean()),
          'interval': scoring.interval(dependence, 0.95),
          'seconds': time.perf_counter() - start}


def run_identifiability(args):
  import logging

  from tokenspace_jax.models import load_model

  logging.basicConfig(level=logging.WARNING)
  words = tuple(w for w in args.words.split(',') if w)
  for model in args.models.split(','):
    lm = load_model(model)
    for prompt in (args.prompts or 'fewshot').split(','):
      for feature in args.features.split(','):
        path = os.path.join(args.out, 'identifiability', model, prompt, f'{feature}.json')
        if os.path.exists(path):
          continue
        result = identifiability(lm, model, prompt, feature, args.random, args.train,
                                 arg=args.arg, words=words)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
          json.dump(result, f, indent=1, ensure_ascii=False)
        lo, hi = result['interval']
        print(f'{model:20s} {prompt:13s} {feature:8s} identifiability '
              f'{result["identifiability"]:+.3f} [{lo:+.3f}, {hi:+.3f}]  reference '
              f'{result["labels"][0]["auroc"]:.3f}  random {result["random_mean"]:.3f}  '
              f'({result["seconds"]:.0f} s)', flush=True)


def run_descent(args):
  import logging

  from tokenspace_jax import config_defaults, main
  from tokenspace_jax.models import load_model
  from tokenspace_jax.outputs import views

  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  for model in args.models.split(','):
    lm = load_model(model)
    for feature in args.features.split(','):
      # Without --prompts, the model's own prompt (MODEL_PROMPTS), as its config would run.
      prompt = (args.prompts.split(',')[0] if args.prompts else
                config_defaults.MODEL_PROMPTS.get(model, 'fewshot'))
      # model= first: it replaces the config's own model and its prompt, and --arg after it
      # wins; the prompt is set below.
      arg = ','.join(filter(None, [f'model={model}', args.arg]))
      config = config_for(feature, arg)
      from ml_collections import ConfigDict

      config.prompt = ConfigDict(candidate_prompts()[prompt])
      name = f'{feature}{"-" + args.tag if args.tag else ""}'
      workdir = os.path.join(args.out, 'descent', model, prompt, name)
      result = main.run(config, workdir, lm=lm)
      print(views.summary(result), flush=True)


def _load(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def table(args):
  root = os.path.join(args.out, 'identifiability')
  lines = ['| model | prompt | contrast | feature | identifiability [95% interval] | '
           'reference AUROC | best other word | random mean |',
           '|---|---|---:|---|---|---:|---|---:|']
  for model in MODELS:
    for prompt in sorted(os.listdir(os.path.join(root, model))) if os.path.isdir(
        os.path.join(root, model)) else []:
      for feature in FEATURES:
        path = os.path.join(root, model, prompt, f'{feature}.json')
        if not os.path.exists(path):
          continue
        r = _load(path)
        other = max((x for x in r['labels'] if x['role'] == 'other'), key=lambda x: x['auroc'])
        lo, hi = r['interval']
        lines.append(f'| {model} | {prompt} | {r.get("contrast_labels", 0)} | {feature} | '
                     f'{r["identifiability"]:+.3f} '
                     f'[{lo:+.3f}, {hi:+.3f}] | {r["labels"][0]["auroc"]:.3f} | '
                     f'`{other["token"]!r}` {other["auroc"]:.3f} | {r["random_mean"]:.3f} |')
  print('\n'.join(lines))
  root = os.path.join(args.out, 'descent')
  if not os.path.isdir(root):
    return
  lines = ['', '| model | prompt | contrast | feature | label (descent\'s own) | steps | '
           'wall time | held-out AUROC found / reference / random mean | verdict |',
           '|---|---|---:|---|---|---:|---:|---|---|']
  for model in sorted(os.listdir(root)):
    for prompt in sorted(os.listdir(os.path.join(root, model))):
      for name in sorted(os.listdir(os.path.join(root, model, prompt))):
        path = os.path.join(root, model, prompt, name, 'result.json')
        if not os.path.exists(path):
          continue
        r = _load(path)
        config = _load(os.path.join(os.path.dirname(path), 'config.json'))
        contrast = config.get('config', config).get('contrast', {}).get('labels', 0)
        s = {x['role']: x for x in r['heldout']['scores']}
        v = r['heldout']['verdict']
        ci = s['found']['auroc_interval']
        ref = s.get('reference')
        lines.append(
            f'| {model} | {prompt} | {contrast} | {name} | `{r["label"]!r}` '
            f'(`{r["descent_label"]!r}`) | '
            f'{r["steps"]} | {r["wall_seconds"]:.0f} s | {s["found"]["auroc"]:.3f} '
            f'[{ci[0]:.2f}, {ci[1]:.2f}] / {ref["auroc"] if ref else float("nan"):.3f} / '
            f'{v["random_auroc_mean"]:.3f} | {v["status"]}'
            f'{", " + v.get("found_vs_reference", "") + " reference" if ref else ""}'
            f'{", with a caution" if v.get("caution") else ""} |')
  print('\n'.join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('command', choices=('identifiability', 'descent', 'table'))
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--prompts', default='',
                      help="comma-separated prompt names (identifiability: default fewshot; "
                           "descent: the first, default the model's own)")
  parser.add_argument('--features', default=','.join(FEATURES))
  parser.add_argument('--random', type=int, default=8)
  parser.add_argument('--train', type=int, default=128, help='training examples scored')
  parser.add_argument('--words', default='',
                      help='more words scored beside the reference (comma-separated)')
  parser.add_argument('--arg', default='', help='config arguments for descent (e.g. quick)')
  parser.add_argument('--tag', default='', help='suffix of the descent workdir')
  parser.add_argument('--out', default=os.path.join(ROOT, 'workdirs', 'study'))
  args = parser.parse_args()
  {'identifiability': run_identifiability, 'descent': run_descent, 'table': table}[
      args.command](args)


if __name__ == '__main__':
  main()
