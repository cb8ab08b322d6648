"""Defaults shared by every config in configs/, their validated choices, and their validation.

Each ``configs/*.py`` starts from ``get_base_config()`` and applies its argument with
``apply_arg`` (``configs/animal.py:quick,optim.lr=0.3``). ``validate`` checks a config before any
model is loaded or any file written, so a typo fails in a second with the key named. The comment
next to each key is its documentation: ``experiments/config_reference.py`` reads it into
docs/configuration.md.
"""

from __future__ import annotations

import math

from ml_collections import ConfigDict


class ConfigValueError(ValueError):
  """A config value outside what the run supports; the message names the key and the choices."""


# The zero-shot rating prompt of the paper, adapted to single-token answers: SmolLM2's tokenizer
# splits " 1" into two tokens, so the space belongs to the answer prefix.
RATING_PROMPT = dict(
    system=('You are a careful annotator. You will see a text, one word from it, and a concept. '
            'Rate whether the word, as used in the text, is an instance of the concept: answer 1 '
            'if it is, 0 if it is not.'),
    user='Text: {text}\nWord: "{word}"\nConcept: {concept}',
    assistant_prefix='Rating: ',
    yes='1',
    no='0',
    chat=True,
    few_shot=(),
    note='',
)


# Worked examples of concepts other than the built-in features, so no answer is leaked.
FEW_SHOT_EXAMPLES = (('She painted the door red.', 'red', 'color', True),
                     ('We took the bus to school.', 'bus', 'food', False),
                     ('The apple was sweet and crisp.', 'apple', 'color', False),
                     ('He baked fresh bread this morning.', 'bread', 'food', True),
                     ('A truck blocked the narrow street.', 'truck', 'vehicle', True),
                     ('The children were happy all day.', 'happy', 'vehicle', False),
                     ('Her anger faded slowly.', 'anger', 'emotion', True),
                     ('The sky was blue and clear.', 'blue', 'emotion', False))

# The few-shot completion prompt that docs/prompt_study.md found to make SmolLM2-135M's answer
# depend on the concept for the most features: plain text (no chat template), the word in its
# text, answers " Yes"/" No" after "Match:". The label after "Concept:" carries its leading space.
FEWSHOT_PROMPT = dict(
    system='Decide whether the word, as used in the text, is an instance of the concept.',
    user='Text: {text}\nWord: {word}\nConcept: {concept}',
    assistant_prefix='\nMatch:',
    yes=' Yes',
    no=' No',
    chat=False,
    few_shot=tuple(dict(text=t, word=w, concept=c, answer=a) for t, w, c, a in FEW_SHOT_EXAMPLES),
    # a line after each text with the judge's own reading of it, asked once per text
    note='',
)

# The same few-shot prompt as chat turns, rendered with the model's own chat template: each worked
# example a user turn and an assistant answer "Match: Yes" / "Match: No".
FEWSHOT_CHAT_PROMPT = dict(FEWSHOT_PROMPT, chat=True, assistant_prefix='Match:')

# Worked examples of a language concept, so a label naming a language reads as a question about
# the word's language (as the chinese feature asks), not only about categories.
LANGUAGE_EXAMPLES = (("Il fait très beau aujourd'hui.", 'beau', 'French', True),
                     ('She whispered merci before leaving.', 'merci', 'French', True),
                     ('She whispered merci before leaving.', 'leaving', 'French', False),
                     ('Wir gehen morgen ins Kino.', 'Kino', 'Spanish', False))

# A question about the word in its text, as chat turns: "is the word described by the concept
# X?", with worked examples of categories and of languages. Qwen2.5-Coder-1.5B's answer to it
# depends on a language label far more than to the few-shot prompt's "instance of the concept"
# (docs/results.md, "Identifiability").
QUESTION_CHAT_PROMPT = dict(
    FEWSHOT_CHAT_PROMPT,
    system='Answer Yes or No.',
    user='Text: {text}\nIn this text, is the word "{word}" described by the concept {concept}?',
    assistant_prefix='Answer:',
    few_shot=tuple(dict(text=t, word=w, concept=c, answer=a)
                   for t, w, c, a in FEW_SHOT_EXAMPLES + LANGUAGE_EXAMPLES),
)

# Notes the judge writes on each text before it is asked about the text's words
# (classifier/notes.py): the question put to it about a whole text, the start of its answer
# (SmolLM2 answers "This text is in ..." without one; Qwen2.5-Coder-1.5B names the same
# languages either way), and the line that then follows the text in the classifier prompt.
PROMPT_NOTES = {
    'language': ('Which language is this text written in: {text}\nAnswer with one word.',
                 'The text is written in', 'Language of the text: {answer}'),
}

# question_chat with the judge's own reading of each text's language after the text
# (classifier/notes.py): Qwen2.5-Coder-1.5B names a text's language right where, asked about one
# word, it answers about the script (docs/results.md, "Identifiability").
QUESTION_NOTE_CHAT_PROMPT = dict(QUESTION_CHAT_PROMPT, note='language')

PROMPTS = {'fewshot': FEWSHOT_PROMPT, 'fewshot_chat': FEWSHOT_CHAT_PROMPT,
           'rating': RATING_PROMPT, 'question_chat': QUESTION_CHAT_PROMPT,
           'question_note_chat': QUESTION_NOTE_CHAT_PROMPT}

# Keys whose values are checked against a list; each list is spelled here only.
CHOICES = {
    'loss.answer': ('full', 'binary'),
    'optim.name': ('adam', 'adamw'),
    'optim.schedule': ('constant', 'cosine'),
    'data.sampling': ('balanced', 'natural'),
    'label.init': ('zeros', 'normal', 'prior', 'word'),
    'feature.negatives': ('hard', 'natural', 'easy'),
    'model.dtype': ('float32', 'bfloat16'),
    'model.param_dtype': ('', 'float32', 'bfloat16'),
    'model.cache_dtype': ('', 'float32', 'bfloat16'),
    'prompt.note': ('', *PROMPT_NOTES),
}

# Config keys (or whole sections) that may differ between a run and its resumption: they change
# how long a run goes on or how it is reported, not what a step computes.
RESUMABLE_CHANGES = ('steps', 'checkpoint_every', 'early_stop', 'eval', 'progress', 'choice')

MAX_LABEL_TOKENS = 8
MAX_STEPS = 1_000_000

# Grid keys of ``sweep.grid`` -> the per-row hyperparameter each sets.
GRID_KEYS = {'optim.lr': 'lr', 'loss.w_label': 'w_label', 'loss.w_entropy': 'w_entropy',
             'loss.w_kl': 'w_kl'}


def get_base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0  # seed of the label initialisation, the batch schedule and the example caps
  c.steps = 300  # maximum number of descent steps (early stopping may end sooner)
  c.checkpoint_every = 50  # steps between checkpoints in workdir/checkpoints; a rerun resumes
  c.progress = True  # show a progress bar during descent

  # Which model answers the classifier prompt, and in what precision.
  c.model = ConfigDict()
  c.model.source = 'default'  # HF folder, .gguf file, or a named offline model (docs/models.md)
  c.model.dtype = 'float32'  # activation dtype; bfloat16 halves memory (use it for 8B models)
  c.model.param_dtype = ''  # dtype the weights are stored in ('' = the same as model.dtype)
  # dtype the prompt prefixes' keys and values are kept in ('' = model.dtype); bfloat16 halves
  # them under float32 activations, for accelerators (slower on CPU: docs/results.md)
  c.model.cache_dtype = ''

  # The feature to label: a built-in one or an activation-records file, and how its examples
  # are split and capped.
  c.feature = ConfigDict()
  c.feature.name = ''  # a built-in feature: chinese, animal, mammal, number
  c.feature.records = ''  # or an activation-records .jsonl file (docs/own_feature.md)
  c.feature.threshold = 0.0  # records: an activation above this is a positive
  c.feature.reference_word = ''  # human label to compare against ('' = the feature's own)
  c.feature.negatives = 'hard'  # which negatives a built-in feature uses (choices below)
  c.feature.heldout_fraction = 0.2  # records: share of the records held out for scoring
  c.feature.split_seed = 0  # seed of the train/held-out split of a records file
  c.feature.max_train = 192  # at most this many training examples (half positives if possible)
  c.feature.max_heldout = 128  # at most this many held-out examples, picked the same way
  c.feature.window = 64  # records: longer records are cut into windows of this many tokens

  # The classifier prompt the label is placed in (docs/method.md); the default is the few-shot
  # preset, `:rating` selects the other one.
  c.prompt = ConfigDict(FEWSHOT_PROMPT)

  # The learned distribution over the vocabulary that fills the concept slot.
  c.label = ConfigDict()
  c.label.num_tokens = 1  # positions in the concept slot, each with its own logits (K)
  c.label.init = 'prior'  # how the logits start; prior: the model's own guess at the slot
  c.label.init_scale = 1.0  # std of the normal initialisation, or the logit of the word one
  c.label.init_word = ''  # the word whose token init=word starts from (e.g. " animal")
  c.label.temperature = 1.0  # p = softmax(logits / temperature)
  c.label.learn_answer_bias = True  # a learned yes-logit bias absorbs the overall yes/no tendency
  c.label.mask_special = True  # exclude special, control and unprintable tokens from the label

  # The weights of the loss terms (docs/method.md).
  c.loss = ConfigDict()
  c.loss.answer = 'full'  # the answer CE over the whole vocabulary (paper) or the two answers
  c.loss.w_label = 1.0  # weight of the answer cross-entropy
  c.loss.w_entropy = 0.1  # weight of the entropy of p (pushes p to one token), after warm-up
  c.loss.entropy_warmup_steps = 40  # the entropy weight ramps linearly from 0 over these steps
  c.loss.w_kl = 0.02  # weight of KL(p || the model's mean next-token distribution at the slot)

  # The Optax optimizer of the label logits.
  c.optim = ConfigDict()
  c.optim.name = 'adam'  # optimizer of the label logits
  c.optim.lr = 0.25  # learning rate (the peak one under the cosine schedule)
  c.optim.b1 = 0.9  # Adam's first-moment decay
  c.optim.b2 = 0.999  # Adam's second-moment decay
  c.optim.weight_decay = 0.0  # decoupled weight decay (adamw only)
  c.optim.schedule = 'constant'  # learning-rate schedule
  c.optim.warmup_steps = 0  # linear warm-up steps of the cosine schedule
  c.optim.decay_steps = 300  # length of the cosine schedule, warm-up included
  c.optim.final_lr = 0.1  # final learning rate of the cosine schedule, as a fraction of lr
  c.optim.clip_norm = 0.0  # clip the gradient to this global norm (0 disables)

  # How training batches are drawn.
  c.data = ConfigDict()
  c.data.batch_size = 16  # examples per descent step (a multiple of mesh.data)
  c.data.sampling = 'balanced'  # how a batch mixes positives and negatives
  c.data.positive_fraction = 0.5  # share of positives in a batch under balanced sampling

  # When descent stops before `steps`.
  c.early_stop = ConfigDict()
  c.early_stop.prob = 0.9  # stop once the top token's p stays above this ...
  c.early_stop.patience = 10  # ... for this many steps (prob <= 0 disables)
  # Or once the final choice's candidates (the choice.top_k most probable tokens of every label
  # position) have stayed one set for this many steps (docs/method.md, "the loop"); without a
  # choice (choice.top_k=0) there are no candidates to hold, and only the rule above stops.
  c.early_stop.settled = 10  # steps the choice's candidate set must hold (0 disables)

  # The device mesh (docs/scaling.md): examples and their prefix caches split along `data`, the
  # weights along `model` (tensor parallel). -1 takes the remaining devices.
  c.mesh = ConfigDict()
  c.mesh.data = -1  # devices along the data axis (the batch must be a multiple)
  c.mesh.model = 1  # devices along the model axis (weights split by the sharding rules)

  # The classifier's answer as what the label adds (docs/method.md, "Contrast"): each example's
  # yes/no margin is taken relative to its mean margin under random labels, in the loss and in
  # every score, so words the model says "yes" to whatever the concept do not decide the label.
  c.contrast = ConfigDict()
  # The contrast labels are the verdict's first random labels (eval.num_random), each of them
  # scored against the mean of the others, so the pool computes their margins once for both.
  c.contrast.labels = 8  # random labels averaged per example (0: the raw margins, as the paper)

  # Label rows descended together in one run: restarts and a hyperparameter grid.
  c.sweep = ConfigDict()
  c.sweep.restarts = 1  # label rows per grid point; restarts after the first add noise
  c.sweep.noise = 1.0  # std of the Gaussian logits added to restarts after the first
  c.sweep.grid = ''  # e.g. 'optim.lr=0.05,0.2;loss.w_kl=0,0.02' (keys: GRID_KEYS)

  # Discrete search beside the relaxation (docs/method.md#discrete-search): candidates from the
  # gradient at the current top token, each scored exactly on a training batch.
  c.search = ConfigDict()
  c.search.every = 0  # steps between searches (0 disables)
  c.search.candidates = 16  # candidate tokens scored per search

  # The final choice: after descent, tokens scored exactly on the training split; the best
  # one by training AUROC is the label (the held-out split never chooses).
  c.choice = ConfigDict()
  c.choice.top_k = 16  # the descent's most probable tokens that are scored (0: no choice)
  c.choice.candidates = ''  # more candidate words, comma-separated (e.g. ' Chinese, 中文')
  c.choice.examples = 128  # training examples the candidates are scored on (0 = all)
  c.choice.screen = 32  # examples every candidate is scored on first (0: all on all examples)
  c.choice.keep = 4  # best candidates of each row (and its descent label) scored on the rest

  # Held-out scoring of the label against the reference word and random tokens.
  c.eval = ConfigDict()
  c.eval.num_random = 10  # random word-like tokens scored as a baseline (their spread counts)
  c.eval.calibration_examples = 64  # training examples each label's threshold is fitted on
  c.eval.batch_size = 128  # label × example rows per forward pass of scoring (and contrast)
  c.eval.prefix_batch_size = 32  # examples per forward pass of the prefix caching
  # examples of one text keep the prompt up to their word once, as one context (docs/scaling.md)
  c.eval.share_text = True
  c.eval.bootstrap = 1000  # bootstrap resamples of the held-out split for the intervals
  c.eval.confidence = 0.95  # coverage of the reported intervals
  return c


def override(c: ConfigDict, changes: dict) -> ConfigDict:
  """``c`` with dotted keys set, as ``--config.loss.w_kl=0.1`` would: ``{'loss.w_kl': 0.1}``.

  For Python callers (notebooks, experiments, tests); an unknown key raises as on the command
  line.
  """
  for key, value in changes.items():
    node = c
    *path, last = key.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return c


# The prompt each named offline model answers best (docs/prompt_study.md: the identifiability of
# the four built-in features on the training split); other sources keep the config's prompt. The
# label's start, the model's own guess at the slot (label.init=prior), is the base default for
# every model: on the offline models it reaches the same or righter labels in fewer steps than a
# uniform p (docs/results.md, "Starting from the prior"; on Qwen2.5-Coder-0.5B two features,
# under the plain few-shot prompt).
MODEL_PROMPTS = {
    'default': 'fewshot',
    'smollm2-135m': 'fewshot',
    'qwen2.5-coder-0.5b': 'fewshot_chat',
    'qwen2.5-coder-1.5b': 'question_chat',
}

PRESET_ARGS = ('quick', 'two', 'sweep', 'ablation', *PROMPTS)


def apply_arg(c: ConfigDict, arg: str | None) -> ConfigDict:
  """Comma-separated config arguments: presets and ``key=value`` settings, as in big_vision.

  ``configs/animal.py:quick,rating,optim.lr=0.3``. Presets: ``quick`` shortens the run for smoke
  tests and first looks; ``fewshot``, ``fewshot_chat`` and ``rating`` pick the prompt template;
  ``two`` makes the label two tokens; ``sweep`` descends 3 learning rates x 2 restarts together,
  ``ablation`` the entropy and KL weights each on and off (4 rows). ``model=NAME`` sets
  ``model.source`` and, for a named offline model, the prompt it answers best (``MODEL_PROMPTS``).
  Any other ``key=value`` sets a dotted config key, the
  value read as the key's type (``optim.lr=0.3``). Arguments apply in order, so a prompt or key
  named after ``model=`` wins.
  """
  for a in (arg or '').split(','):
    a = a.strip()
    if a == '':
      continue
    if a.startswith('model='):
      c.model.source = a.split('=', 1)[1].strip()
      if c.model.source in MODEL_PROMPTS:
        c.prompt = ConfigDict(PROMPTS[MODEL_PROMPTS[c.model.source]])
    elif '=' in a:
      key, value = (s.strip() for s in a.split('=', 1))
      _set_typed(c, key, value)
    elif a == 'quick':
      c.steps = 20
      c.feature.max_train = 48
      c.feature.max_heldout = 32
      c.eval.num_random = 2
      c.eval.calibration_examples = 16
      c.eval.bootstrap = 200
      c.choice.top_k = 4
      c.choice.examples = 32
      c.choice.screen = 16
      c.choice.keep = 2
      c.data.batch_size = 8
      c.checkpoint_every = 10
    elif a == 'two':
      c.label.num_tokens = 2
    elif a == 'sweep':
      c.sweep.grid = 'optim.lr=0.1,0.25,0.5'
      c.sweep.restarts = 2
    elif a == 'ablation':
      c.sweep.grid = f'loss.w_entropy=0,{c.loss.w_entropy};loss.w_kl=0,{c.loss.w_kl}'
    elif a in PROMPTS:
      c.prompt = ConfigDict(PROMPTS[a])
    else:
      raise ConfigValueError(f'Unknown config argument {a!r}; known: {", ".join(PRESET_ARGS)}, '
                             'model=NAME, or KEY=VALUE for a config key.')
  return c


def _set_typed(c: ConfigDict, key: str, text: str):
  node = c
  *path, last = key.split('.')
  try:
    for part in path:
      node = node[part]
    current = node[last]
  except (KeyError, AttributeError, TypeError):
    raise ConfigValueError(f'Config argument {key}={text}: no config key {key!r}.') from None
  if isinstance(current, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ConfigValueError(f'Config argument {key}={text}: expected true or false.')
    value = text.lower() in ('true', '1')
  elif isinstance(current, (int, float)):
    try:
      value = type(current)(float(text) if isinstance(current, float) else int(text))
    except ValueError:
      raise ConfigValueError(f'Config argument {key}={text}: expected a number '
                             f'({type(current).__name__}).') from None
  elif isinstance(current, str):
    value = text
  else:
    raise ConfigValueError(f'Config argument {key}: only numbers, booleans and strings can be '
                           'set in a config argument; use --config.KEY on the command line.')
  node[last] = value


def _numbers(c: ConfigDict, prefix: str = ''):
  for key, value in c.items():
    name = f'{prefix}{key}'
    if isinstance(value, ConfigDict):
      yield from _numbers(value, name + '.')
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield name, value


def parse_grid(grid: str) -> dict[str, list[float]]:
  """``"optim.lr=0.05,0.1;loss.w_kl=0,0.02"`` -> {key: values}, checked."""
  out = {}
  for part in filter(None, (p.strip() for p in grid.split(';'))):
    key, sep, values = part.partition('=')
    key = key.strip()
    if not sep or key not in GRID_KEYS:
      raise ConfigValueError(f'sweep.grid entry {part!r}: expected KEY=V1,V2,... with KEY one of '
                             f'{", ".join(GRID_KEYS)} (entries separated by ";").')
    try:
      out[key] = [float(v) for v in values.split(',')]
    except ValueError:
      raise ConfigValueError(f'sweep.grid entry {part!r}: values must be numbers.') from None
    bad = [v for v in out[key] if not math.isfinite(v) or v < 0 or (key == 'optim.lr' and v == 0)]
    if bad:
      raise ConfigValueError(f'sweep.grid entry {part!r}: {bad} out of range (finite, '
                             f'{"positive" if key == "optim.lr" else "non-negative"}).')
  return out


def validate(config: ConfigDict, builtin_features=()):
  """Refuses values a run would otherwise reject deep inside; before any model or file.

  ``builtin_features`` are the names ``feature.name`` may take.
  """
  for key, choices in CHOICES.items():
    section, name = key.split('.')
    value = config[section].get(name, '')
    if value not in choices:
      raise ConfigValueError(f'{key}={value!r} is not one of {", ".join(map(repr, choices))}.')
  for key, value in _numbers(config):
    if not math.isfinite(value):
      raise ConfigValueError(f'{key}={value} is not a finite number.')

  def need(key, ok, what):
    section, _, name = key.rpartition('.')
    value = config[section][name] if section else config[name]
    if not ok(value):
      raise ConfigValueError(f'{key}={value} {what}.')

  positive = lambda v: v > 0
  non_negative = lambda v: v >= 0
  for key in ('steps', 'checkpoint_every', 'optim.lr', 'data.batch_size', 'eval.batch_size',
              'eval.prefix_batch_size',
              'label.temperature', 'feature.max_train', 'feature.max_heldout',
              'early_stop.patience', 'sweep.restarts', 'search.candidates', 'feature.window',
              'choice.keep'):
    need(key, positive, 'must be positive')
  for key in ('loss.w_label', 'loss.w_entropy', 'loss.w_kl', 'loss.entropy_warmup_steps',
              'optim.weight_decay', 'optim.warmup_steps', 'optim.clip_norm', 'sweep.noise',
              'search.every', 'choice.top_k', 'choice.examples', 'choice.screen',
              'eval.num_random',
              'eval.calibration_examples', 'eval.bootstrap', 'label.init_scale',
              'contrast.labels', 'early_stop.settled'):
    need(key, non_negative, 'must not be negative')
  # The schedule holds every step's batch up front: a typo of a few zeros must not fill memory.
  need('steps', lambda v: v <= MAX_STEPS, f'is more than {MAX_STEPS:,} steps')
  need('label.temperature', lambda v: v >= 1e-3, 'must be at least 0.001 (p = softmax(v / T))')
  need('label.num_tokens', lambda v: 1 <= v <= MAX_LABEL_TOKENS,
       f'must be between 1 and {MAX_LABEL_TOKENS}')
  need('data.positive_fraction', lambda v: 0 < v < 1, 'must be strictly between 0 and 1')
  need('feature.heldout_fraction', lambda v: 0 < v < 1, 'must be strictly between 0 and 1')
  need('eval.confidence', lambda v: 0 < v < 1, 'must be strictly between 0 and 1')
  need('contrast.labels', lambda v: v != 1,
       'must be 0 (no contrast) or at least 2 (each random label the verdict scores is compared '
       'with the mean of the others)')
  need('early_stop.prob', lambda v: v <= 1, 'must be at most 1 (0 or less disables)')
  need('optim.b1', lambda v: 0 <= v < 1, 'must be in [0, 1)')
  need('optim.b2', lambda v: 0 <= v < 1, 'must be in [0, 1)')
  need('optim.final_lr', non_negative, 'must not be negative')
  if config.optim.schedule == 'cosine':
    need('optim.decay_steps', lambda v: v > config.optim.warmup_steps,
         'must exceed optim.warmup_steps under the cosine schedule')
  for axis in ('data', 'model'):
    need(f'mesh.{axis}', lambda v: v == -1 or v >= 1,
         'must be a device count or -1 (the remaining devices)')
  if config.label.init == 'word' and not config.label.init_word:
    raise ConfigValueError('label.init=word needs label.init_word (e.g. " animal").')
  f = config.feature
  if not f.name and not f.records:
    raise ConfigValueError('Set feature.name (a built-in feature) or feature.records (an '
                           'activation-records .jsonl file).')
  if f.name and builtin_features and f.name not in builtin_features and not f.records:
    raise ConfigValueError(f'Unknown feature {f.name!r}. Built-in features: '
                           f'{", ".join(builtin_features)}; or set feature.records to an '
                           'activation-records .jsonl file.')
  parse_grid(config.sweep.grid)
