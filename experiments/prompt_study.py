"""Which classifier prompt makes SmolLM2-135M-Instruct's yes/no judgement depend on the concept?

Token-space gradient descent only works if the frozen model's answer changes with the label in the
concept slot. This study scores fixed discrete labels in that slot -- the right word for each
feature (both with and without a leading space), the other three features' words and 8 random
common words -- over small hand-made word-level sets (24 positives, 24 negatives with hard
negatives, per feature), for several prompt templates and answer-token pairs. For each label it
reports the AUROC of d = logit(yes) - logit(no) at the answer position, the accuracy at the best
threshold, mean P(yes) (two-way) and the mass P(yes) + P(no) under the full softmax, and the
*calibrated* loss: the cross-entropy of sigmoid(d + b) with the best scalar bias b per label (an
uncalibrated loss is dominated by the model's overall yes/no tendency). The key numbers are the
label dependence, AUROC(correct) - mean AUROC(random labels), and the rank of the correct label by
calibrated loss among all labels tried.

Everything before the concept slot is cached: the shared preamble (system prompt, few-shot
examples) once per template, the text and word once per (template, feature); only the label and
the short fixed tail are run per label. One forward gives every answer-token pair of a template
(e.g. ``1``/``0`` after ``Rating:`` and after ``Rating: ``), since they are read at different
positions of the same tail.

Run (CPU only; on 2 shared cores all 12 templates took 17 minutes, the 7 templates of the main
table in docs/prompt_study.md 8 minutes):

  python experiments/prompt_study.py [--out DIR] [--templates NAME,NAME]

Writes ``DIR/prompt_study.json`` (default DIR: /tmp/prompt_study: per-label metrics including
the raw d values, and the per-(template, answer, feature) summary) and prints the tables.
Results are in docs/prompt_study.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time

import jax
import jax.numpy as jnp
import numpy as np

from tokenspace_jax.config_defaults import FEW_SHOT_EXAMPLES
from tokenspace_jax.models import KVCache, load_model

# --------------------------------------------------------------------------------------------
# Evaluation sets: (text, word) pairs; the word occurs in the text.

_CHINESE_POS = [
    ('我喜欢喝茶。', '茶'), ('今天天气很好。', '天气'), ('他是我的朋友。', '朋友'),
    ('我们明天去北京。', '北京'), ('这本书很有意思。', '有意思'), ('请给我一杯水。', '水'),
    ('The restaurant sign said 欢迎 in gold letters.', '欢迎'),
    ('She wrote 谢谢 on the card.', '谢谢'),
    ('My teacher taught me the word 学习 today.', '学习'),
    ('The menu listed 饺子 as the special.', '饺子'), ('他每天早上跑步。', '跑步'),
    ('妈妈在厨房做饭。', '厨房'), ('我们一起看电影吧。', '电影'),
    ('中国有很多美丽的城市。', '城市'), ('He said 你好 to everyone at the party.', '你好'),
    ('The poster had the word 和平 in the middle.', '和平'), ('学生们在教室里读书。', '教室'),
    ('我的手机没电了。', '手机'), ('這個問題很簡單。', '問題'), ('我們在台北見面。', '台北'),
    ('The chef added 酱油 to the sauce.', '酱油'), ('她的名字叫小红。', '名字'),
    ('昨天下雨了。', '下雨'), ('Grandpa practised writing 春天 with a brush.', '春天'),
]
_CHINESE_NEG = [
    # hard: Japanese and Korean
    ('東京に行きました。', '東京'), ('ありがとうございます。', 'ありがとう'),
    ('コーヒーを飲みます。', 'コーヒー'), ('すみません、駅はどこですか。', 'すみません'),
    ('今日はとても暑いです。', '暑い'), ('The film was called すずめ in Japan.', 'すずめ'),
    ('She said こんにちは to the shopkeeper.', 'こんにちは'),
    ('안녕하세요, 만나서 반갑습니다.', '안녕하세요'), ('저는 한국 사람입니다.', '사람입니다'),
    ('He learned the word 사랑 from a song.', '사랑'), ('오늘 날씨가 좋아요.', '날씨가'),
    ('The sign in Seoul read 감사합니다.', '감사합니다'),
    # easy: English words, many in mixed sentences
    ('The restaurant sign said 欢迎 in gold letters.', 'restaurant'),
    ('She wrote 谢谢 on the card.', 'card'),
    ('My teacher taught me the word 学习 today.', 'teacher'),
    ('The menu listed 饺子 as the special.', 'menu'),
    ('He said 你好 to everyone at the party.', 'party'),
    ('The chef added 酱油 to the sauce.', 'sauce'),
    ('We walked along the river after dinner.', 'river'),
    ('The library opens at nine.', 'library'),
    ('Grandpa practised writing 春天 with a brush.', 'brush'),
    ('She bought a new bicycle yesterday.', 'bicycle'),
    ('The poster had the word 和平 in the middle.', 'poster'),
    ('He learned the word 사랑 from a song.', 'song'),
]
_ANIMAL_POS = [
    ('The cat slept on the sofa all afternoon.', 'cat'), ('A dog barked at the mailman.', 'dog'),
    ('We saw an elephant at the zoo.', 'elephant'),
    ('The eagle circled high above the valley.', 'eagle'),
    ('A snake slid under the rock.', 'snake'), ('The farmer fed the horses at dawn.', 'horses'),
    ('A shark swam close to the boat.', 'shark'), ('Bees buzzed around the flowers.', 'Bees'),
    ('The frog jumped into the pond.', 'frog'), ('A lion roared in the distance.', 'lion'),
    ('The kids watched a spider build its web.', 'spider'),
    ('Two rabbits hid in the tall grass.', 'rabbits'),
    ('The cow gave a lot of milk this week.', 'cow'),
    ('A dolphin leapt out of the water.', 'dolphin'), ('The owl hooted all night.', 'owl'),
    ('Ants carried crumbs across the table.', 'Ants'),
    ('She keeps a turtle in a glass tank.', 'turtle'), ('A wolf howled at the moon.', 'wolf'),
    ('The mouse ran behind the fridge.', 'mouse'), ('We fed bread to the ducks.', 'ducks'),
    ('The tiger paced inside its enclosure.', 'tiger'), ('A salmon swam upstream.', 'salmon'),
    ('The monkey grabbed a banana.', 'monkey'), ('A butterfly landed on her hand.', 'butterfly'),
]
_ANIMAL_NEG = [
    # hard: plants, fungi, food, objects, animal-named things
    ('The oak tree in the yard is very old.', 'oak'),
    ('She planted roses along the fence.', 'roses'), ('Mushrooms grew under the log.', 'Mushrooms'),
    ('He drives a Jaguar to work.', 'Jaguar'), ('Click the mouse twice to open the file.', 'mouse'),
    ('Traders feared a bear market.', 'bear'), ('The monkey grabbed a banana.', 'banana'),
    ('She put the cactus on the windowsill.', 'cactus'),
    ('The wheat was ready for harvest.', 'wheat'), ('He ate a steak for dinner.', 'steak'),
    ('The kids watched a spider build its web.', 'web'),
    ('Moss covered the north side of the stones.', 'Moss'),
    # easy
    ('The cat slept on the sofa all afternoon.', 'sofa'),
    ('A dog barked at the mailman.', 'barked'),
    ('We saw an elephant at the zoo.', 'zoo'), ('The farmer fed the horses at dawn.', 'dawn'),
    ('A shark swam close to the boat.', 'boat'), ('The frog jumped into the pond.', 'pond'),
    ('The cow gave a lot of milk this week.', 'week'),
    ('She keeps a turtle in a glass tank.', 'glass'),
    ('The mouse ran behind the fridge.', 'fridge'),
    ('The tiger paced inside its enclosure.', 'paced'), ('The library opens at nine.', 'library'),
    ('She bought a new bicycle yesterday.', 'bicycle'),
]
_MAMMAL_POS = [
    ('The cat slept on the sofa all afternoon.', 'cat'), ('A dog barked at the mailman.', 'dog'),
    ('We saw an elephant at the zoo.', 'elephant'),
    ('The farmer fed the horses at dawn.', 'horses'),
    ('A lion roared in the distance.', 'lion'), ('Two rabbits hid in the tall grass.', 'rabbits'),
    ('The cow gave a lot of milk this week.', 'cow'),
    ('A dolphin leapt out of the water.', 'dolphin'), ('A wolf howled at the moon.', 'wolf'),
    ('The mouse ran behind the fridge.', 'mouse'),
    ('The tiger paced inside its enclosure.', 'tiger'), ('The monkey grabbed a banana.', 'monkey'),
    ('A whale surfaced near the ship.', 'whale'), ('Bats flew out of the cave at dusk.', 'Bats'),
    ('The bear caught a fish in the river.', 'bear'),
    ('A squirrel buried nuts in the garden.', 'squirrel'),
    ('The goat climbed the steep hill.', 'goat'), ('A fox crept toward the barn.', 'fox'),
    ('The pig rolled in the mud.', 'pig'), ('A deer crossed the road at night.', 'deer'),
    ('The kangaroo hopped across the field.', 'kangaroo'),
    ('The sheep grazed on the hillside.', 'sheep'),
    ('A giraffe ate leaves from the tree.', 'giraffe'),
    ('The platypus swam in the creek.', 'platypus'),
]
_MAMMAL_NEG = [
    # hard: other animals
    ('The eagle circled high above the valley.', 'eagle'),
    ('A snake slid under the rock.', 'snake'),
    ('A shark swam close to the boat.', 'shark'), ('Bees buzzed around the flowers.', 'Bees'),
    ('The frog jumped into the pond.', 'frog'),
    ('The kids watched a spider build its web.', 'spider'), ('The owl hooted all night.', 'owl'),
    ('Ants carried crumbs across the table.', 'Ants'),
    ('She keeps a turtle in a glass tank.', 'turtle'), ('We fed bread to the ducks.', 'ducks'),
    ('A salmon swam upstream.', 'salmon'), ('A butterfly landed on her hand.', 'butterfly'),
    ('The bear caught a fish in the river.', 'fish'),
    ('The parrot repeated every word.', 'parrot'),
    ('A crocodile rested on the riverbank.', 'crocodile'),
    ('The catfish hid in the mud.', 'catfish'),
    # easy
    ('A whale surfaced near the ship.', 'ship'), ('Bats flew out of the cave at dusk.', 'cave'),
    ('A squirrel buried nuts in the garden.', 'garden'),
    ('The goat climbed the steep hill.', 'hill'),
    ('The pig rolled in the mud.', 'mud'), ('A deer crossed the road at night.', 'road'),
    ('A giraffe ate leaves from the tree.', 'tree'),
    ('The sheep grazed on the hillside.', 'grazed'),
]
_NUMBER_POS = [
    ('She has three brothers.', 'three'), ('The train leaves at 7 tonight.', '7'),
    ('He paid 42 dollars for the shoes.', '42'), ('The recipe needs two eggs.', 'two'),
    ('There were twelve people at dinner.', 'twelve'),
    ('The town has a population of 5000.', '5000'), ('I waited for twenty minutes.', 'twenty'),
    ('The building was finished in 1999.', '1999'), ('They planted a hundred trees.', 'hundred'),
    ('The box weighs 3.5 kilograms.', '3.5'), ('We need five more chairs.', 'five'),
    ('A million people watched the game.', 'million'), ('She scored 98 on the test.', '98'),
    ('The score was zero at halftime.', 'zero'), ('He bought a dozen eggs.', 'dozen'),
    ('Only one student passed the exam.', 'one'), ('The room number is 214.', '214'),
    ('Seven ships left the harbor.', 'Seven'), ('My grandmother is ninety years old.', 'ninety'),
    ('The bridge is 800 meters long.', '800'), ('We have four cats and a dog.', 'four'),
    ('It costs 1,000 euros.', '1,000'), ('Eight runners finished the race.', 'Eight'),
    ('The book has six chapters.', 'six'),
]
_NUMBER_NEG = [
    # hard: ordinals, pronoun "one", months, weekdays, multiplicatives, quantifiers
    ('She finished third in the race.', 'third'), ('No one answered the phone.', 'one'),
    ('I like the red one better.', 'one'), ('Someone left the door open.', 'Someone'),
    ('We meet every Monday.', 'Monday'), ('The festival is in October.', 'October'),
    ('I have been there twice.', 'twice'), ('Several people complained.', 'Several'),
    ('Write the number on the board.', 'number'), ('His birthday is on the 21st.', '21st'),
    ('She ordered a double espresso.', 'double'), ('None of them came.', 'None'),
    ('He was the first to arrive.', 'first'), ('A few students stayed late.', 'few'),
    # easy
    ('She has three brothers.', 'brothers'), ('He paid 42 dollars for the shoes.', 'shoes'),
    ('The recipe needs two eggs.', 'recipe'), ('I waited for twenty minutes.', 'waited'),
    ('The building was finished in 1999.', 'building'), ('The box weighs 3.5 kilograms.', 'box'),
    ('A million people watched the game.', 'game'), ('The bridge is 800 meters long.', 'bridge'),
    ('We have four cats and a dog.', 'cats'), ('The book has six chapters.', 'chapters'),
]
DATA = {
    'chinese': (_CHINESE_POS, _CHINESE_NEG), 'animal': (_ANIMAL_POS, _ANIMAL_NEG),
    'mammal': (_MAMMAL_POS, _MAMMAL_NEG), 'number': (_NUMBER_POS, _NUMBER_NEG),
}
REFERENCE = {'chinese': 'Chinese', 'animal': 'animal', 'mammal': 'mammal', 'number': 'number'}
# Random labels: common nouns, single tokens with and without a leading space; none is a feature
# word or a few-shot concept (color, food, vehicle, emotion).
RANDOM_POOL = ['house', 'water', 'music', 'table', 'river', 'paper', 'money', 'window', 'city',
               'light', 'game', 'book', 'door', 'road', 'stone', 'friend', 'school', 'story',
               'time', 'world', 'power', 'heart', 'king', 'car', 'computer', 'weather']
N_RANDOM = 8

# --------------------------------------------------------------------------------------------
# Templates. A prompt is preamble + item(text, word) + LABEL + tail. The tail is a sequence of
# strings and readout markers (yes, no): a marker reads the answer logits at the last token so far.

# Few-shot examples: other concepts than the four tested; each concept once right, once wrong.
SHOTS = list(FEW_SHOT_EXAMPLES)  # the examples the default prompt uses
# Contrastive shots: each word once under its own concept (Yes) and once under another (No), so
# the answer can only be got right by reading the concept.
CONTRAST_SHOTS = [('He baked fresh bread this morning.', 'bread', 'food', True),
                  ('He baked fresh bread this morning.', 'bread', 'vehicle', False),
                  ('A truck blocked the narrow street.', 'truck', 'emotion', False),
                  ('A truck blocked the narrow street.', 'truck', 'vehicle', True),
                  ('Her anger faded slowly.', 'anger', 'emotion', True),
                  ('Her anger faded slowly.', 'anger', 'color', False),
                  ('She painted the door red.', 'red', 'food', False),
                  ('She painted the door red.', 'red', 'color', True)]

ASSISTANT = '<|im_end|>\n<|im_start|>assistant\n'


def chatml(system: str, turns: list[tuple[str, str]] = ()) -> str:
  """System turn plus finished (user, assistant) turns, in SmolLM2's ChatML."""
  s = f'<|im_start|>system\n{system}<|im_end|>\n'
  for user, answer in turns:
    s += f'<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n'
  return s


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  preamble: str
  item: str  # str.format with {text} and {word}; the label follows directly
  tail: tuple
  space: bool = True  # the natural label form has a leading space (' animal' after 'Concept:')


def _shots(fmt: str, yes: str = 'Yes', no: str = 'No', shots=SHOTS) -> str:
  return ''.join(fmt.format(text=t, word=w, concept=c, answer=yes if a else no)
                 for t, w, c, a in shots)


SYS_RATE_TEXT = ('You are a precise annotator. You are given a text, one word from that text, and '
                 'a concept. Rate 1 if the word, as used in the text, relates to the concept. '
                 'Otherwise rate 0. Answer with a single digit.')
SYS_RATE_WORD = ('You are a precise annotator. You are given a word and a concept. Rate 1 if the '
                 'word relates to the concept. Otherwise rate 0. Answer with a single digit.')
SYS_YN_TEXT = ('You are a precise annotator. You are given a text, one word from that text, and a '
               'concept. Answer Yes if the word, as used in the text, is an instance of the '
               'concept. Otherwise answer No.')
SYS_YN_WORD = ('You are a precise annotator. You are given a word and a concept. Answer Yes if '
               'the word is an instance of the concept. Otherwise answer No.')
CHAT_TEXT_ITEM = '<|im_start|>user\nText: {text}\nWord: "{word}"\nConcept:'
CHAT_WORD_ITEM = '<|im_start|>user\nWord: "{word}"\nConcept:'
RATE_TAIL = (ASSISTANT, ('1', '0'), 'Rating:', ('1', '0'), ' ', ('1', '0'))
YN_TAIL = (ASSISTANT, ('Yes', 'No'), 'Answer:', (' Yes', ' No'))

TEMPLATES = [
    # Zero-shot chat, the paper's style of rating prompt.
    Template('zs_rate_text', chatml(SYS_RATE_TEXT), CHAT_TEXT_ITEM, RATE_TAIL),
    Template('zs_rate_word', chatml(SYS_RATE_WORD), CHAT_WORD_ITEM, RATE_TAIL),
    # Zero-shot chat, Yes/No.
    Template('zs_yn_text', chatml(SYS_YN_TEXT), CHAT_TEXT_ITEM, YN_TAIL),
    Template('zs_yn_word', chatml(SYS_YN_WORD), CHAT_WORD_ITEM, YN_TAIL),
    Template('zs_kindof_word', chatml('You are a helpful assistant.'),
             '<|im_start|>user\nIs "{word}" a kind of',
             ('? Answer Yes or No.' + ASSISTANT, ('Yes', 'No'), 'Answer:', (' Yes', ' No'))),
    # Few-shot, plain completion (no chat template).
    Template('fs_plain_word',
             'Decide whether each word is an instance of the concept.\n\n'
             + _shots('Word: {word}\nConcept: {concept}\nMatch: {answer}\n\n'),
             'Word: {word}\nConcept:', ('\nMatch:', (' Yes', ' No'))),
    Template('fs_contrast_word',
             'Decide whether each word is an instance of the concept.\n\n'
             + _shots('Word: {word}\nConcept: {concept}\nMatch: {answer}\n\n',
                      shots=CONTRAST_SHOTS),
             'Word: {word}\nConcept:', ('\nMatch:', (' Yes', ' No'))),
    Template('fs_plain_text',
             'Decide whether the word, as used in the text, is an instance of the concept.\n\n'
             + _shots('Text: {text}\nWord: {word}\nConcept: {concept}\nMatch: {answer}\n\n'),
             'Text: {text}\nWord: {word}\nConcept:', ('\nMatch:', (' Yes', ' No'))),
    Template('fs_plain_word_quoted',
             'Decide whether each word is an instance of the concept.\n\n'
             + _shots('Word: "{word}"\nConcept: "{concept}"\nMatch: {answer}\n\n'),
             'Word: "{word}"\nConcept: "', ('"\nMatch:', (' Yes', ' No')), space=False),
    Template('fs_plain_word_rate',
             'Rate 1 if the word is an instance of the concept, otherwise 0.\n\n'
             + _shots('Word: {word}\nConcept: {concept}\nRating: {answer}\n\n', '1', '0'),
             'Word: {word}\nConcept:', ('\nRating:', ('1', '0'), ' ', ('1', '0'))),
    Template('fs_qa_kindof',
             'Answer each question with Yes or No.\n\n'
             + _shots('Q: Is "{word}" a kind of {concept}?\nA: {answer}\n\n'),
             'Q: Is "{word}" a kind of', ('?\nA:', (' Yes', ' No'))),
    # Few-shot as chat turns.
    Template('fs_chat_word',
             chatml('Answer Yes if the word is an instance of the concept, otherwise answer No.',
                    [(f'Word: "{w}"\nConcept: {c}', 'Yes' if a else 'No')
                     for _, w, c, a in SHOTS]),
             CHAT_WORD_ITEM, (ASSISTANT, ('Yes', 'No'))),
]


# --------------------------------------------------------------------------------------------
# Model side: cached prefill of preamble and item, then label + tail per label.


def _bucket(n: int, step: int) -> int:
  return max(step, -(-n // step) * step)


class Scorer:
  """Jitted, shape-bucketed forward passes with a fixed-capacity KV cache."""

  def __init__(self, lm, batch: int, capacity: int, read_ids: list[int], max_reads: int = 4):
    self.lm, self.batch, self.capacity, self.max_reads = lm, batch, capacity, max_reads
    self.read_ids = jnp.asarray(read_ids, jnp.int32)
    model, cfg = lm.model, lm.config

    def prefill(params, ids, mask):
      cache = KVCache.empty(cfg, 1, capacity)
      _, cache = model.apply({'params': params}, ids, input_mask=mask, cache=cache,
                             return_hidden=True)
      rep = lambda x: jnp.repeat(x, batch, axis=1)
      return KVCache(k=rep(cache.k), v=rep(cache.v), valid=jnp.repeat(cache.valid, batch, 0),
                     end=cache.end)

    def extend(params, cache, ids, mask):
      return model.apply({'params': params}, ids, input_mask=mask, cache=cache,
                         return_hidden=True)[1]

    def score(params, cache, ids, mask, pos):
      hidden, _ = model.apply({'params': params}, ids, input_mask=mask, cache=cache,
                              return_hidden=True)
      h = hidden[:, pos]  # [B, P, H]
      logits = model.apply({'params': params}, h, method='logits')  # [B, P, V]
      lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
      return jnp.take(logits, self.read_ids, axis=-1) - lse  # log-probs [B, P, R]

    self._prefill, self._extend, self._score = jax.jit(prefill), jax.jit(extend), jax.jit(score)

  @staticmethod
  def _left_pad(seqs: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = True
    return ids, mask

  def context(self, preamble: list[int], items: list[list[int]]) -> KVCache:
    ids, mask = self._left_pad([preamble], _bucket(len(preamble), 64))
    cache = self._prefill(self.lm.params, ids, mask)
    ids, mask = self._left_pad(items, _bucket(max(map(len, items)), 16))
    cache = self._extend(self.lm.params, cache, ids, mask)
    assert int(cache.end) <= self.capacity, 'cache capacity too small'
    return cache

  def score(self, cache: KVCache, block: list[int], reads: list[int]) -> np.ndarray:
    """Log-probs [B, len(reads), R] at positions ``reads`` of ``block`` (same for every item)."""
    t = _bucket(len(block), 8)
    ids = np.zeros((self.batch, t), np.int32)
    ids[:, :len(block)] = block
    mask = np.zeros((self.batch, t), bool)
    mask[:, :len(block)] = True  # right padding: never seen by the positions that are read
    pos = np.zeros(self.max_reads, np.int32)
    pos[:len(reads)] = reads
    out = self._score(self.lm.params, cache, ids, mask, pos)
    return np.asarray(out)[:, :len(reads)]


# --------------------------------------------------------------------------------------------
# Metrics.


def auroc(d: np.ndarray, y: np.ndarray) -> float:
  """Probability that a random positive outscores a random negative (ties count half)."""
  pos, neg = d[y], d[~y]
  return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
               / (len(pos) * len(neg)))


def best_accuracy(d: np.ndarray, y: np.ndarray) -> float:
  cuts = np.concatenate([[-np.inf], np.sort(d)])
  return float(max(((d > c) == y).mean() for c in cuts))


def bce(z: np.ndarray, y: np.ndarray) -> float:
  """Mean cross-entropy of sigmoid(z) against y."""
  return float(np.mean(np.logaddexp(0, -z) * y + np.logaddexp(0, z) * ~y))


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 0.5 * (1 + np.tanh(0.5 * z))


def calibrated(d: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(loss, b): cross-entropy of sigmoid(d + b) at the best scalar bias b.

  The loss is convex in b and its derivative mean(sigmoid(d + b)) - mean(y) is increasing, so b
  is found by bisection (Newton steps oscillate when every |d + b| is large).
  """
  lo, hi = -float(d.max()) - 50, -float(d.min()) + 50
  for _ in range(200):
    b = 0.5 * (lo + hi)
    if np.mean(_sigmoid(d + b)) > y.mean():
      hi = b
    else:
      lo = b
  b = 0.5 * (lo + hi)
  return bce(d + b, y), b


def label_metrics(logp_yes: np.ndarray, logp_no: np.ndarray, y: np.ndarray) -> dict:
  d = logp_yes - logp_no
  loss_cal, b = calibrated(d, y)
  return {'auroc': auroc(d, y), 'best_acc': best_accuracy(d, y),
          'mean_p_yes': float(np.mean(_sigmoid(d))),
          'answer_mass': float(np.mean(np.exp(logp_yes) + np.exp(logp_no))),
          'loss_raw': bce(d, y), 'loss_cal': loss_cal, 'bias_cal': b,
          'mean_d_pos': float(d[y].mean()), 'mean_d_neg': float(d[~y].mean()),
          'd': [round(float(x), 4) for x in d]}


# --------------------------------------------------------------------------------------------


def _encode(tok, s: str) -> list[int]:
  return tok.encode(s, add_special_tokens=False)


def compile_tail(tok, tail: tuple) -> tuple[list[int], list[tuple[str, int, str, str]]]:
  """Tail ids and its readouts: (answer name, index into tail ids, yes string, no string)."""
  ids, reads, text = [], [], ''
  for piece in tail:
    if isinstance(piece, str):
      ids += _encode(tok, piece)
      text += piece
    else:
      yes, no = piece
      shown = text.split('\n')[-1]  # e.g. 'Rating: '
      reads.append((f'{shown!r}+{yes!r}/{no!r}', len(ids) - 1, yes, no))
  return ids, reads


def run(lm, templates: list[Template]) -> dict:
  tok = lm.tokenizer
  rng = random.Random(0)
  random_words = rng.sample(RANDOM_POOL, N_RANDOM)
  answer_strs = sorted({s for t in templates for p in t.tail if not isinstance(p, str)
                        for s in p})
  read_ids = []
  for s in answer_strs:
    ids = _encode(tok, s)
    assert len(ids) == 1, f'answer {s!r} is not one token: {ids}'
    read_ids.append(ids[0])
  col = {s: i for i, s in enumerate(answer_strs)}

  # Cache capacity: the largest preamble + item bucket over all templates.
  items = {f: [(t, w, True) for t, w in pos] + [(t, w, False) for t, w in neg]
           for f, (pos, neg) in DATA.items()}
  batch = len(next(iter(items.values())))
  assert all(len(v) == batch for v in items.values())
  capacity = 0
  for t in templates:
    pre = _bucket(len(_encode(tok, t.preamble)), 64)
    longest = max(len(_encode(tok, t.item.format(text=x, word=w)))
                  for v in items.values() for x, w, _ in v)
    capacity = max(capacity, pre + _bucket(longest, 16))
  scorer = Scorer(lm, batch, capacity, read_ids)

  results = []
  for t in templates:
    t0 = time.perf_counter()
    tail_ids, reads = compile_tail(tok, t.tail)
    sp = ' ' if t.space else ''
    alt = '' if t.space else ' '
    for feature, rows in items.items():
      y = np.array([r[2] for r in rows])
      cache = scorer.context(_encode(tok, t.preamble),
                             [_encode(tok, t.item.format(text=x, word=w)) for x, w, _ in rows])
      labels = ([('correct', sp + REFERENCE[feature]), ('correct_alt', alt + REFERENCE[feature])]
                + [('other', sp + REFERENCE[g]) for g in DATA if g != feature]
                + [('random', sp + w) for w in random_words])
      for kind, label in labels:
        label_ids = _encode(tok, label)
        positions = [len(label_ids) + i for _, i, _, _ in reads]
        out = scorer.score(cache, label_ids + tail_ids, positions)
        for k, (answer, _, yes, no) in enumerate(reads):
          m = label_metrics(out[:, k, col[yes]], out[:, k, col[no]], y)
          results.append({'template': t.name, 'answer': answer, 'feature': feature,
                          'kind': kind, 'label': label, 'label_tokens': len(label_ids), **m})
    print(f'[{t.name}] {time.perf_counter() - t0:.1f}s', flush=True)
  return {'random_words': random_words, 'batch': batch, 'capacity': capacity,
          'labels': results, 'summary': summarize(results)}


def summarize(results: list[dict]) -> list[dict]:
  groups: dict = {}
  for r in results:
    groups.setdefault((r['template'], r['answer'], r['feature']), []).append(r)
  out = []
  for (tname, answer, feature), rs in groups.items():
    kinds: dict = {}
    for r in rs:
      kinds.setdefault(r['kind'], []).append(r)
    correct, alt = kinds['correct'][0], kinds['correct_alt'][0]
    rand, other = kinds['random'], kinds['other']
    ranked = [correct] + other + rand  # the alternative spelling is reported, not ranked
    rank_cal = 1 + sum(r['loss_cal'] < correct['loss_cal'] for r in ranked)
    rank_auc = 1 + sum(r['auroc'] > correct['auroc'] for r in ranked)
    rand_auc = np.array([r['auroc'] for r in rand])
    best_other = max(other, key=lambda r: r['auroc'])
    out.append({
        'template': tname, 'answer': answer, 'feature': feature,
        'auroc_correct': correct['auroc'], 'auroc_correct_alt': alt['auroc'],
        'alt_tokens': alt['label_tokens'], 'correct_tokens': correct['label_tokens'],
        'auroc_random_mean': float(rand_auc.mean()), 'auroc_random_std': float(rand_auc.std()),
        'auroc_random_max': float(rand_auc.max()),
        'dependence': correct['auroc'] - float(rand_auc.mean()),
        'best_acc_correct': correct['best_acc'], 'p_yes_correct': correct['mean_p_yes'],
        'mass_correct': correct['answer_mass'],
        'loss_cal_correct': correct['loss_cal'],
        'loss_cal_random_mean': float(np.mean([r['loss_cal'] for r in rand])),
        'rank_cal': rank_cal, 'rank_auroc': rank_auc, 'n_ranked': len(ranked),
        'best_other': best_other['label'], 'auroc_best_other': best_other['auroc']})
  return out


def print_tables(summary: list[dict]) -> None:
  head = (f'{"template":21} {"answer":26} {"feature":8} {"AUC":>5} {"alt":>5} {"rand":>5} '
          f'{"±":>4} {"dep":>6} {"acc":>4} {"Pyes":>4} {"mass":>4} {"rk":>2}/{"n":<2} '
          f'{"rkA":>3} best-other')
  print(head)
  print('-' * len(head))
  for s in summary:
    print(f'{s["template"]:21} {s["answer"]:26} {s["feature"]:8} {s["auroc_correct"]:5.2f} '
          f'{s["auroc_correct_alt"]:5.2f} {s["auroc_random_mean"]:5.2f} '
          f'{s["auroc_random_std"]:4.2f} {s["dependence"]:+6.2f} {s["best_acc_correct"]:4.2f} '
          f'{s["p_yes_correct"]:4.2f} {s["mass_correct"]:4.2f} '
          f'{s["rank_cal"]:2d}/{s["n_ranked"]:<2d} '
          f'{s["rank_auroc"]:3d} {s["best_other"]!r}={s["auroc_best_other"]:.2f}')
  print('\nPer template x answer (over the 4 features):')
  agg: dict = {}
  for s in summary:
    agg.setdefault((s['template'], s['answer']), []).append(s)
  head = (f'{"template":21} {"answer":26} {"mean dep":>8} {"min dep":>7} {"mean AUC":>8} '
          f'{"#rank1 cal":>10} {"#rank1 AUC":>10}')
  print(head)
  print('-' * len(head))
  rows = sorted(agg.items(), key=lambda kv: -np.mean([s['dependence'] for s in kv[1]]))
  for (tname, answer), ss in rows:
    deps = [s['dependence'] for s in ss]
    print(f'{tname:21} {answer:26} {np.mean(deps):+8.3f} {min(deps):+7.3f} '
          f'{np.mean([s["auroc_correct"] for s in ss]):8.3f} '
          f'{sum(s["rank_cal"] == 1 for s in ss):10d} {sum(s["rank_auroc"] == 1 for s in ss):10d}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='/tmp/prompt_study')
  parser.add_argument('--templates', default='', help='comma-separated subset of template names')
  args = parser.parse_args()
  wanted = [s for s in args.templates.split(',') if s]
  templates = [t for t in TEMPLATES if not wanted or t.name in wanted]
  start = time.perf_counter()
  lm = load_model('default')
  # The hand-written ChatML must match the tokenizer's own template.
  ref = lm.tokenizer.apply_chat_template(
      [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'U'}], tokenize=False,
      add_generation_prompt=True)
  assert ref == chatml('S') + '<|im_start|>user\nU' + ASSISTANT, ref
  result = run(lm, templates)
  result['templates'] = [dataclasses.asdict(t) for t in templates]
  result['seconds'] = time.perf_counter() - start
  print_tables(result['summary'])
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'prompt_study.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
  print(f'\nwrote {path} ({result["seconds"]:.0f}s)')


if __name__ == '__main__':
  main()
