"""Writes docs/configuration.md, the configuration reference, from the configs' own defaults.

    python experiments/config_reference.py            # rewrite docs/configuration.md
    python experiments/config_reference.py --out=X    # write elsewhere (the test compares)

The reference is generated, not written by hand, so it cannot drift from the code: every key and
default comes from ``config_defaults.get_base_config()``, each key's meaning from the comment
next to it in ``config_defaults.py`` (read from the source with ``tokenize`` and ``ast``), the
validated choices from ``config_defaults.CHOICES``, and what each ``configs/*.py`` file and argument
changes from calling them and diffing against the defaults. ``tests/test_docs.py`` fails when the
committed file differs from what this script writes.

A key without a comment falls back to ``DESCRIPTIONS`` below; the script lists such keys on
stderr so the comment can be added in ``config_defaults.py``, where it stays next to the value it
describes (the fallback entry then becomes unused, and the script says so).
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import inspect
import io
import os
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tokenspace_jax import config_defaults  # noqa: E402

OUT = os.path.join(ROOT, 'docs', 'configuration.md')

# What a section is for, unless a comment above ``c.SECTION = ConfigDict()`` says it.
SECTIONS = {
    '': 'Run length, seeding and output.',
}

# Fallback meanings for keys that have no comment in config_defaults.py. Prefer adding the
# comment there; the script reports which entries are used and which have become redundant.
DESCRIPTIONS = {
    'prompt.system': 'Instruction before the examples (the system message when `chat`).',
    'prompt.user': 'Per-example template with `{text}`, `{word}` and, last, `{concept}`: only '
                   'what precedes the concept slot is cached.',
    'prompt.assistant_prefix': 'Text after the user turn, right before the answer token.',
    'prompt.yes': 'The "yes" answer; must be a single token.',
    'prompt.no': 'The "no" answer; must be a single token.',
    'prompt.chat': "Render with the tokenizer's chat template; False: plain completion text.",
    'prompt.few_shot': 'Worked examples (`text`, `word`, `concept`, `answer`) before the query.',
}

# What each value validated by config_defaults.CHOICES does; the keys' comments only name them.
CHOICE_NOTES = {
    ('loss.answer', 'full'): 'cross-entropy of the answer softmaxed over the whole vocabulary, '
                             'as in the paper: the label must also make the model answer at all',
    ('loss.answer', 'binary'): 'cross-entropy over the two answer tokens only',
    ('optim.name', 'adam'): '`optax.adam`',
    ('optim.name', 'adamw'): '`optax.adamw` with `optim.weight_decay`',
    ('optim.schedule', 'constant'): '`optim.lr` throughout',
    ('optim.schedule', 'cosine'): 'linear warm-up over `warmup_steps`, then cosine decay to '
                                  '`final_lr * lr` at `decay_steps`',
    ('data.sampling', 'balanced'): 'each batch holds `positive_fraction` positives, whatever the '
                                   "feature's base rate",
    ('data.sampling', 'natural'): 'batches drawn at the base rate of the training split',
    ('label.init', 'zeros'): 'uniform p: no token favoured',
    ('label.init', 'normal'): 'logits drawn from N(0, `init_scale`)',
    ('label.init', 'prior'): ("the model's own mean next-token log-probabilities at the slot "
                              '(the default)'),
    ('label.init', 'word'): '`init_scale` on the token of `label.init_word`, 0 elsewhere',
    ('feature.negatives', 'hard'): 'built-in features: every hard negative (near misses such as '
                                   'birds and fish for `mammal`) plus up to two ordinary words '
                                   'per sentence',
    ('feature.negatives', 'natural'): 'built-in features: every other word of the texts, '
                                      'unbalanced, as a real activation dump would give',
    ('feature.negatives', 'easy'): 'built-in features: no hard negatives, as many ordinary words '
                                   'instead, so only difficulty changes, not balance',
    ('model.dtype', 'float32'): 'full precision (the default; 135M parameters fit anywhere)',
    ('model.dtype', 'bfloat16'): "half the memory: Llama-3-8B's weights take 16 GB instead of "
                                 '32 GB',
    ('model.param_dtype', ''): 'the weights stored in `model.dtype`',
    ('model.param_dtype', 'float32'): 'weights in float32 (with bfloat16 activations: exact '
                                      'weights, half-precision arithmetic)',
    ('model.param_dtype', 'bfloat16'): 'weights in bfloat16',
    ('model.cache_dtype', ''): 'the prefix caches kept in `model.dtype`',
    ('model.cache_dtype', 'float32'): 'prefix caches in float32',
    ('model.cache_dtype', 'bfloat16'): 'prefix caches in bfloat16: half their memory under '
                                       'float32 activations, which still compute them',
    ('prompt.note', ''): 'the text alone',
    ('prompt.note', 'language'): 'the judge is asked which language each text is written in, '
                                 'and "Language of the text: X" follows the text (an instruct '
                                 "model's chat template is needed)",
}


# ---------------------------------------------------------------------------------------------
# Reading the comments next to the keys.


def _comments_by_line(source: str) -> dict[int, str]:
  out = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      out[tok.start[0]] = tok.string.lstrip('#').strip()
  return out


def _dotted(node: ast.AST, root: str) -> str | None:
  """``c.loss.w_kl`` -> ``'loss.w_kl'`` when the chain starts at ``root``."""
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name) and node.id == root and names:
    return '.'.join(reversed(names))
  return None


def _comment_for(line: int, lines: list[str], comments: dict[int, str]) -> str:
  """The trailing comment on ``line``, else the block of full-line comments right above it."""
  if line in comments and lines[line - 1].lstrip()[:1] != '#':
    return comments[line]
  block, i = [], line - 1
  while i in comments and lines[i - 1].lstrip().startswith('#'):
    block.insert(0, comments[i])
    i -= 1
  return ' '.join(block)


def source_comments(source: str | None = None,
                    function: str = 'get_base_config') -> tuple[dict[str, str], list[str]]:
  """(comment of each key, keys in the order ``function`` assigns them) in ``source``.

  ``function`` starts with ``c = ...`` (a ConfigDict); the default reads config_defaults.py.
  """
  source = inspect.getsource(config_defaults) if source is None else source
  lines, comments = source.splitlines(), _comments_by_line(source)
  tree = ast.parse(source)
  presets = {}  # module-level NAME = dict(k=..., ...): ConfigDict(NAME) takes its keys
  for node in tree.body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name) and node.value.func.id == 'dict'):
      presets[node.targets[0].id] = node.value.keywords
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
  root = fn.body[0].targets[0].id  # c = ConfigDict()
  found, order = {}, []
  for node in fn.body:
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    key = _dotted(node.targets[0], root)
    if key is None:
      continue
    order.append(key)
    found[key] = _comment_for(node.lineno, lines, comments)
    value = node.value
    if (isinstance(value, ast.Call) and value.args and isinstance(value.args[0], ast.Name)
        and value.args[0].id in presets):
      for kw in presets[value.args[0].id]:
        order.append(f'{key}.{kw.arg}')
        found[f'{key}.{kw.arg}'] = _comment_for(kw.value.lineno, lines, comments)
  return {k: v for k, v in found.items() if v}, order


# ---------------------------------------------------------------------------------------------
# Values, types and diffs.


def flatten(cfg, prefix: str = '') -> dict:
  out = {}
  for key, value in cfg.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'items') and not isinstance(value, dict):  # a ConfigDict section
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def type_name(value) -> str:
  if isinstance(value, (tuple, list)):
    inner = {type(v).__name__ for v in value}
    return f'{type(value).__name__} of {inner.pop()}' if len(inner) == 1 else type(value).__name__
  return type(value).__name__


def show(value, limit: int = 48) -> str:
  """A value for a table cell: its repr, shortened, with `|` escaped."""
  if isinstance(value, (tuple, list)) and value and isinstance(value[0], dict):
    return f'{len(value)} examples ([presets](#prompt-presets))'
  text = repr(value)
  if len(text) > limit:
    text = text[:limit - 1] + '…'
  return '`' + text.replace('|', '\\|') + '`'


def cell(text: str) -> str:
  return text.replace('|', '\\|').replace('\n', ' ')


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location(f'_config_{os.path.basename(path)[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_arguments() -> list[str]:
  """The preset arguments ``apply_arg`` accepts (``KEY=VALUE`` and ``model=NAME`` besides)."""
  return list(config_defaults.PRESET_ARGS)


def diff(before: dict, after: dict) -> dict:
  return {k: after[k] for k in after if k not in before or before[k] != after[k]}


def preset_name(after: dict) -> str | None:
  """The name of the prompt preset a flattened config's ``prompt.*`` keys are, if any."""
  prompt = lambda flat: {k: v for k, v in flat.items() if k.startswith('prompt.')}
  for name in config_defaults.PROMPTS:
    preset = config_defaults.apply_arg(config_defaults.get_base_config(), name)
    if prompt(flatten(preset)) == prompt(after):
      return name
  return None


def diff_text(changes: dict, after: dict) -> str:
  if not changes:
    return 'nothing (the default)'
  prompts = [k for k in changes if k.startswith('prompt.')]
  if len(prompts) > 1:
    rest = ', '.join(f'`{k}={changes[k]!r}`' for k in changes if k not in prompts)
    name = preset_name(after)
    which = f'the `{name}` [preset](#prompt-presets)' if name else 'a [preset](#prompt-presets)'
    return f'the prompt: `prompt.*` of {which}' + (f'; {rest}' if rest else '')
  return ', '.join(f'`{k}={changes[k]!r}`' for k in changes)


# ---------------------------------------------------------------------------------------------
# The document.


def _only_choices(comment: str, key: str) -> bool:
  words = {w.strip() for w in comment.split('|')}
  return key in config_defaults.CHOICES and words <= set(config_defaults.CHOICES[key])


def render() -> tuple[str, list[str], list[str], list[str]]:
  """(markdown, keys described from DESCRIPTIONS, keys with no description, redundant entries)."""
  base = flatten(config_defaults.get_base_config())
  comments, order = source_comments()
  keys = [k for k in order if k in base] + sorted(k for k in base if k not in order)
  from_fallback, missing = [], []
  lines = [
      '# Configuration reference',
      '',
      '<!-- Generated by experiments/config_reference.py from tokenspace_jax/config_defaults.py '
      '(its CHOICES and comments) and configs/*.py. Do not edit by hand: change the code or its '
      'comments and rerun `python experiments/config_reference.py`; tests/test_docs.py checks '
      'this file is current. -->',
      '',
      'Every run starts from `config_defaults.get_base_config()`; a config file in `configs/` '
      'sets the feature, and command-line flags override single keys:',
      '',
      '```bash',
      'python -m tokenspace_jax.main --config=configs/animal.py:quick \\',
      '    --config.optim.lr=0.3 --config.loss.w_kl=0.1 --workdir=workdirs/animal-lr0.3',
      '```',
      '',
      'An override must name an existing key and have its type (an int is accepted for a '
      'float). Keys with listed choices are checked by `config_defaults.validate` before the '
      'model loads or anything is written, as are ranges (every number finite, step counts, '
      'batch sizes, the learning rate and the temperature positive, loss weights not negative, '
      'fractions strictly between 0 and 1), so a typo fails in a second, not after caching. '
      'Config arguments (`configs/animal.py:quick,optim.lr=0.3`) take presets and `KEY=VALUE` '
      'settings. A workdir remembers its config and inputs: resuming with different values is '
      'refused '
      f'except for `{"`, `".join(config_defaults.RESUMABLE_CHANGES)}`.',
      '',
  ]
  sections = list(dict.fromkeys(k.rsplit('.', 1)[0] if '.' in k else '' for k in keys))
  for section in sections:
    title = f'`{section}`' if section else 'Top level'
    lines += [f'## {title}', '']
    about = comments.get(section) or SECTIONS.get(section)
    if about is None:
      missing.append(f'section {section}')
    else:
      lines += [about, '']
    lines += ['| key | default | type | choices | meaning |', '|---|---|---|---|---|']
    for key in keys:
      if (key.rsplit('.', 1)[0] if '.' in key else '') != section:
        continue
      meaning = comments.get(key)
      if meaning is not None and _only_choices(meaning, key):
        meaning = None  # e.g. 'zeros | normal | prior | word': the choices column says that
      if meaning is None and key in DESCRIPTIONS:
        meaning = DESCRIPTIONS[key]
        from_fallback.append(key)
      if meaning is None:
        meaning = '*(no description: add a comment next to the key in config_defaults.py)*'
        missing.append(key)
      choices = ', '.join(f'`{c}`' for c in config_defaults.CHOICES.get(key, ()))
      lines.append(f'| `{key}` | {show(base[key])} | {type_name(base[key])} | {choices} | '
                   f'{cell(meaning)} |')
    lines.append('')

  choice_lines, missing_choices = _choices()
  missing += missing_choices
  file_lines, missing_in_files = _config_files()
  missing += missing_in_files
  lines += choice_lines + _prompt_presets() + file_lines
  redundant = sorted(k for k in DESCRIPTIONS
                     if k in comments and not _only_choices(comments[k], k))
  redundant += sorted(f'section {k}' for k in SECTIONS if k in comments)
  unknown = sorted(k for k in DESCRIPTIONS if k not in base)
  return '\n'.join(lines).rstrip() + '\n', from_fallback, missing, redundant + unknown


def _choices() -> tuple[list[str], list[str]]:
  lines = ['## Validated choices', '',
           'The values `config_defaults.validate` accepts for these keys; anything else stops the '
           'run before the model loads, naming the key and the choices.', '',
           '| key | value | what it does |', '|---|---|---|']
  missing = []
  for key, choices in config_defaults.CHOICES.items():
    for choice in choices:
      note = CHOICE_NOTES.get((key, choice))
      if note is None:
        missing.append(f'{key}={choice}')
        note = '*(no description: add one to CHOICE_NOTES in experiments/config_reference.py)*'
      lines.append(f'| `{key}` | `{choice}` | {cell(note)} |')
  return lines + [''], missing


def _prompt_presets() -> list[str]:
  lines = ['## Prompt presets', '',
           'The templates of `config_defaults.PROMPTS`, selected by the config argument of '
           'the same name (`configs/animal.py:rating`). Why the few-shot one is the default: '
           '[prompt study](prompt_study.md).', '']
  for name, preset in config_defaults.PROMPTS.items():
    lines += [f'### `{name}`', '', '| key | value |', '|---|---|']
    for key, value in preset.items():
      if key != 'few_shot':
        lines.append(f'| `{key}` | `{cell(repr(value))}` |')
    shots = preset.get('few_shot') or ()
    lines.append(f'| `few_shot` | {len(shots)} examples{" (below)" if shots else ""} |')
    lines.append('')
    if shots:
      lines += ['| text | word | concept | answer |', '|---|---|---|---|']
      lines += [f'| {cell(s["text"])} | {cell(s["word"])} | {cell(s["concept"])} | '
                f'{"yes" if s["answer"] else "no"} |' for s in shots]
      lines.append('')
  return lines


def _config_files() -> tuple[list[str], list[str]]:
  base = flatten(config_defaults.get_base_config())
  args = config_arguments()
  lines = ['## Config files and their arguments', '',
           'Each `configs/NAME.py` defines `get_config(arg)`; the argument follows the path after '
           'a colon, comma-separated (`configs/mammal.py:quick,rating`).', '',
           '| file | first line of its docstring | sets (against the defaults) |', '|---|---|---|']
  per_arg: dict[str, dict[str, str]] = {a: {} for a in args}
  added, missing = [], []
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    module = load_config_module(path)
    own = flatten(module.get_config())
    name = f'configs/{os.path.basename(path)}'
    doc = (module.__doc__ or '').strip().splitlines()
    changes = diff_text(diff(base, own), own)
    lines.append(f'| `{name}` | {cell(doc[0] if doc else "")} | {changes} |')
    with open(path, encoding='utf-8') as f:
      comments, _ = source_comments(f.read(), 'get_config')
    for key in own:
      if key not in base:
        meaning = comments.get(key)
        if meaning is None:
          missing.append(f'{name}: {key}')
          meaning = '*(no description: add a comment next to the key in the config file)*'
        added.append((name, key, own[key], meaning))
    for a in args:
      try:
        after = flatten(module.get_config(a))
        per_arg[a][name] = diff_text(diff(own, after), after)
      except Exception as e:  # noqa: BLE001 - a config may not support every argument
        per_arg[a][name] = f'not supported ({type(e).__name__})'
  if added:
    lines += ['', 'Keys a config file adds to the defaults (meanings from its comments):', '',
              '| file | key | default | meaning |', '|---|---|---|---|']
    lines += [f'| `{name}` | `{key}` | {show(value)} | {cell(meaning)} |'
              for name, key, value, meaning in added]
  lines += ['', '| argument | changes |', '|---|---|']
  models = '; '.join(f'`{m}` → `prompt={p}`' for m, p in config_defaults.MODEL_PROMPTS.items())
  lines.append(f'| `:model=NAME` | `model.source=NAME`, and for a named offline model the '
               f'prompt it answers best ({models}) |')
  lines.append('| `:KEY=VALUE` | the dotted config key, the value read as its type '
               '(`:optim.lr=0.3`) |')
  for a in args:
    texts = per_arg[a]
    if len(set(texts.values())) == 1:
      lines.append(f'| `:{a}` | {next(iter(texts.values()))} |')
    else:
      for name, text in texts.items():
        lines.append(f'| `{name}:{a}` | {text} |')
  lines.append('')
  return lines, missing


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=OUT, help='where to write the reference')
  args = parser.parse_args(argv)
  text, from_fallback, missing, redundant = render()
  with open(args.out, 'w', encoding='utf-8') as f:
    f.write(text)
  print(f'Wrote {args.out}')
  if from_fallback:
    print(f'{len(from_fallback)} keys have no comment in config_defaults.py and are described '
          f'from DESCRIPTIONS in this script: {", ".join(from_fallback)}', file=sys.stderr)
  if missing:
    print(f'{len(missing)} keys, sections or choices have no description: {", ".join(missing)}',
          file=sys.stderr)
  if redundant:
    print(f'DESCRIPTIONS/SECTIONS entries no longer used (now a comment, or gone): '
          f'{", ".join(redundant)}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
