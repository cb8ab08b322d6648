"""Defaults shared by every config in configs/; each starts from get_base_config()."""

from ml_collections import ConfigDict

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
)

PROMPTS = {'fewshot': FEWSHOT_PROMPT, 'rating': RATING_PROMPT}


def get_base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.steps = 300
  c.checkpoint_every = 50
  c.progress = True

  c.model = ConfigDict()
  c.model.source = 'default'  # HF folder, .gguf file, or 'default' (SmolLM2-135M-Instruct Q4_1)
  c.model.dtype = 'float32'
  c.model.param_dtype = ''  # '' = same as dtype

  c.feature = ConfigDict()
  c.feature.name = ''  # built-in: chinese, animal, mammal, number
  c.feature.records = ''  # or an activation-records .jsonl file
  c.feature.threshold = 0.0  # records: activation > threshold is a positive
  c.feature.reference_word = ''  # human label to compare against ('' = the feature's own)
  c.feature.negatives = 'hard'  # built-in features: hard | natural | easy
  c.feature.heldout_fraction = 0.2  # records only; built-in features have a fixed split
  c.feature.split_seed = 0
  c.feature.max_train = 192
  c.feature.max_heldout = 128

  c.prompt = ConfigDict(FEWSHOT_PROMPT)

  c.label = ConfigDict()
  c.label.num_tokens = 1
  c.label.init = 'zeros'  # zeros | normal | prior | word
  c.label.init_scale = 1.0
  c.label.init_word = ''
  c.label.temperature = 1.0
  c.label.learn_answer_bias = True
  c.label.mask_special = True

  c.loss = ConfigDict()
  c.loss.answer = 'full'  # full: CE over the whole vocabulary (paper) | binary: yes vs no only
  c.loss.w_label = 1.0
  c.loss.w_entropy = 0.1
  c.loss.entropy_warmup_steps = 100
  c.loss.w_kl = 0.02

  c.optim = ConfigDict()
  c.optim.name = 'adam'
  c.optim.lr = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.schedule = 'constant'  # constant | cosine
  c.optim.warmup_steps = 0
  c.optim.decay_steps = 300
  c.optim.final_lr = 0.1
  c.optim.clip_norm = 0.0

  c.data = ConfigDict()
  c.data.batch_size = 16
  c.data.sampling = 'balanced'  # balanced | natural
  c.data.positive_fraction = 0.5

  c.early_stop = ConfigDict()
  c.early_stop.prob = 0.9  # stop once the top token's p stays above this ...
  c.early_stop.patience = 25  # ... for this many steps (prob <= 0 disables)

  # The device mesh (docs/scaling.md): examples and their prefix caches split along `data`, the
  # weights along `model` (tensor parallel). -1 takes the remaining devices; with one device in
  # all the run is the plain single-device step.
  c.mesh = ConfigDict()
  c.mesh.data = -1  # devices along the data axis (the batch must be a multiple)
  c.mesh.model = 1  # devices along the model axis (weights split by sharding.PARAM_RULES)

  # Restarts and sweeps in one run (tokenspace_jax/sweep.py): label rows descended together.
  c.sweep = ConfigDict()
  c.sweep.restarts = 1  # label rows per grid point; restarts after the first add noise
  c.sweep.noise = 1.0  # std of the Gaussian logits added to restarts after the first
  c.sweep.grid = ''  # e.g. 'optim.lr=0.05,0.2;loss.w_kl=0,0.02' (keys: sweep.GRID_KEYS)

  c.eval = ConfigDict()
  c.eval.num_random = 5
  c.eval.calibration_examples = 64
  c.eval.batch_size = 32
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


def apply_arg(c: ConfigDict, arg: str | None) -> ConfigDict:
  """Comma-separated config arguments, e.g. ``configs/animal.py:quick,rating``.

  ``quick`` shortens the run for smoke tests and first looks; ``fewshot`` and ``rating`` pick
  the prompt template; ``two`` makes the label two tokens; ``sweep`` descends 3 learning rates
  x 2 restarts together, ``ablation`` the entropy and KL weights each on and off (4 rows).
  """
  for a in (arg or '').split(','):
    if a == '':
      continue
    if a == 'quick':
      c.steps = 20
      c.feature.max_train = 48
      c.feature.max_heldout = 32
      c.eval.num_random = 2
      c.eval.calibration_examples = 16
      c.data.batch_size = 8
      c.checkpoint_every = 10
    elif a == 'two':
      c.label.num_tokens = 2
    elif a == 'sweep':
      c.sweep.grid = 'optim.lr=0.05,0.1,0.2'
      c.sweep.restarts = 2
    elif a == 'ablation':
      c.sweep.grid = f'loss.w_entropy=0,{c.loss.w_entropy};loss.w_kl=0,{c.loss.w_kl}'
    elif a in PROMPTS:
      c.prompt = ConfigDict(PROMPTS[a])
    else:
      raise ValueError(f'Unknown config argument {a!r}; known: quick, two, sweep, ablation, '
                       f'{", ".join(PROMPTS)}.')
  return c
