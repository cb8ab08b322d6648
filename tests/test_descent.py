"""The descent objective and step on tiny random models: gradients, the cache, a planted label."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.classifier import prefix, prompts
from tokenspace_jax.classifier.objective import LossWeights, Objective
from tokenspace_jax.engine import descent, rows
from tokenspace_jax.engine.scoring import auroc
from tokenspace_jax.models import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False)
YES, NO = 3, 4


def _tiny(dtype=jnp.float32, seed=0, config=TINY):
  model = Llama(config, dtype=dtype, param_dtype=dtype)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.int32))['params']
  # Larger weights than the 0.02 init, so the label visibly changes the answer.
  params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, params)
  return model, params


SHARED = np.array([11, 12, 13, 14], np.int32)  # instructions every prompt starts with


def _prefixes(n=12, width=10, seed=0, max_pad=4):
  """Per-example prefix tokens after SHARED, left-padded to different lengths."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, TINY.vocab_size, (n, width)).astype(np.int32)
  mask = np.ones((n, width), bool)
  for i in range(n):
    mask[i, :rng.integers(0, max_pad)] = False
  return ids, mask


def _data(model, params, targets, schedule, tail=(7, 8, 9)):
  ids, mask = _prefixes(len(targets))
  caches = prefix.prefix_caches(model, params, SHARED, ids, mask, chunk=4)
  return descent.DescentData(
      params=params, caches=caches, targets=jnp.asarray(targets, jnp.float32),
      schedule=jnp.asarray(schedule, jnp.int32), tail_ids=jnp.asarray(tail, jnp.int32),
      answer_ids=jnp.asarray([YES, NO], jnp.int32),
      allowed=jnp.ones(TINY.vocab_size, bool).at[:5].set(False),
      mean_log_prior=caches.log_prior.mean(0))


@pytest.mark.parametrize('full_vocab', [True, False])
def test_gradient_matches_finite_differences(full_vocab):
  with jax.enable_x64(True):
    model, params = _tiny(jnp.float64)
    targets = np.array([1, 0] * 6, np.float64)
    data = _data(model, params, targets, np.arange(12)[None])
    objective = Objective(model, LossWeights(1.0, 0.3, 0, 0.2), full_vocab_answer=full_vocab)
    rng = np.random.default_rng(1)
    label = {'logits': jnp.asarray(rng.normal(size=(1, TINY.vocab_size))),
             'answer_bias': jnp.asarray(0.3)}
    idx = jnp.arange(12)

    def loss(lab):
      return objective(lab, params, data.caches, idx, data.targets, data.tail_ids,
                       data.answer_ids, data.allowed, data.mean_log_prior, jnp.asarray(0))[0]

    loss = jax.jit(loss)
    grad = jax.grad(loss)(label)
    eps = 1e-6
    for _ in range(3):
      direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), label)
      plus = jax.tree.map(lambda x, d: x + eps * d, label, direction)
      minus = jax.tree.map(lambda x, d: x - eps * d, label, direction)
      numeric = (loss(plus) - loss(minus)) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                    jax.tree.leaves(direction), strict=True))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('width,max_pad', [(10, 4), (40, 36)])
def test_cached_tail_equals_full_prompt(width, max_pad):
  """The answer from [cached prefix | label | tail] equals one uncached pass over all of it,
  for prompts of similar and of very different lengths."""
  model, params = _tiny()
  ids, mask = _prefixes(6, width, max_pad=max_pad)
  caches = prefix.prefix_caches(model, params, SHARED, ids, mask, chunk=4)
  assert caches.valid.shape[1] == width
  assert caches.k.shape[1] == width + mask.sum()  # packed: no padding is stored
  np.testing.assert_array_equal(caches.valid, mask)
  # Chunks run as wide as their longest prompt (rounded up to pad_to): every width computes
  # the same caches as the common one, each token written to its packed place.
  for pad_to in (1, width):
    other = prefix.prefix_caches(model, params, SHARED, ids, mask, chunk=4, pad_to=pad_to)
    np.testing.assert_array_equal(other.valid, mask)
    for got, want in ((other.k, caches.k), (other.v, caches.v)):
      # The tiny random model's keys reach ~100: float32 rounding, relative to that scale.
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                                 atol=1e-5 * float(np.abs(want).max()))
    np.testing.assert_allclose(other.log_prior, caches.log_prior, rtol=1e-4, atol=1e-4)
  rng = np.random.default_rng(0)
  p = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, TINY.vocab_size)) * 3))
  emb = p @ params['embed']
  tail = jnp.asarray([7, 8, 9], jnp.int32)
  answers = jnp.asarray([YES, NO], jnp.int32)
  for full_vocab in (True, False):
    cached = prefix.answer_log_probs(model, params, caches.take(jnp.arange(6)), emb, tail,
                                         answers, jnp.asarray(0.0), full_vocab)
    x = jnp.concatenate([jnp.broadcast_to(params['embed'][SHARED], (6, 4, 32)),
                         params['embed'][ids], jnp.broadcast_to(emb, (6, 1, 32)),
                         jnp.broadcast_to(params['embed'][tail], (6, 3, 32))], axis=1)
    full_mask = jnp.concatenate([jnp.ones((6, 4), bool), mask, jnp.ones((6, 4), bool)], axis=1)
    logits, _ = model.apply({'params': params}, embeddings=x, input_mask=full_mask)
    last = logits[:, -1]
    if not full_vocab:
      last = last[:, answers]
    expected = jax.nn.log_softmax(last, -1)
    expected = expected[:, answers] if full_vocab else expected
    np.testing.assert_allclose(cached, expected, atol=1e-5)
  # The slot's prior is the uncached model's next-token distribution after the prefix.
  full_ids = jnp.concatenate([jnp.broadcast_to(SHARED, (6, 4)), ids], axis=1)
  full_mask = jnp.concatenate([jnp.ones((6, 4), bool), mask], axis=1)
  logits, _ = model.apply({'params': params}, full_ids, input_mask=full_mask)
  np.testing.assert_allclose(caches.log_prior, jax.nn.log_softmax(logits[:, -1]), atol=1e-5)


def test_bfloat16_caches_are_the_float32_caches_rounded():
  """``model.cache_dtype=bfloat16`` keeps the float32 computation and rounds only what is stored:
  the keys and values are the float32 ones cast once, and the answers read from them move by
  bfloat16's relative precision, not more."""
  model, params = _tiny()
  ids, mask = _prefixes(6, 10)
  f32 = prefix.prefix_caches(model, params, SHARED, ids, mask, chunk=4)
  bf16 = prefix.prefix_caches(model, params, SHARED, ids, mask, chunk=4,
                              cache_dtype=jnp.bfloat16)
  assert bf16.k.dtype == bf16.v.dtype == bf16.shared_k.dtype == jnp.bfloat16
  assert f32.k.dtype == jnp.float32
  for got, want in ((bf16.k, f32.k), (bf16.v, f32.v), (bf16.shared_k, f32.shared_k)):
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(want.astype(jnp.bfloat16), np.float32))
  np.testing.assert_allclose(bf16.log_prior, f32.log_prior, atol=1e-5)  # computed before storing
  emb = jax.nn.softmax(jnp.linspace(-2, 2, TINY.vocab_size))[None] @ params['embed']
  args = (emb, jnp.asarray([7, 8, 9], jnp.int32), jnp.asarray([YES, NO], jnp.int32),
          jnp.asarray(0.0), False)
  want = prefix.answer_log_probs(model, params, f32.take(jnp.arange(6)), *args)
  got = prefix.answer_log_probs(model, params, bf16.take(jnp.arange(6)), *args)
  assert got.dtype == jnp.float32
  spread = float(jnp.abs(want[:, 0] - want[:, 1]).max())
  assert 0 < float(jnp.abs(got - want).max()) < 0.05 * spread


def test_split_contexts_shares_a_text_within_each_block():
  """Examples of one key share their longest common prefix, less one token each, within their
  block; blocks hold equally many contexts, padded with empty ones."""
  rest = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [7, 8], [1, 2, 9], [7, 8, 9], [7]]
  keys = ['a', 'a', 'b', 'a', 'b', 'c']
  contexts, context_of, own = prompts.split_contexts(rest, keys, blocks=1)
  assert contexts == [[1, 2], [7], []]
  np.testing.assert_array_equal(context_of, [0, 0, 1, 0, 1, 2])
  assert own == [[3, 4], [3, 5, 6], [8], [9], [8, 9], [7]]
  for i, r in enumerate(rest):  # nothing lost or reordered, and every example keeps a token
    assert contexts[context_of[i]] + own[i] == r and own[i]
  # Two blocks of three: 'a' and 'b' appear in both, each block with its own copy; block 0
  # holds two contexts, block 1 three, so block 0 is padded with an empty one. A one-token
  # example alone with its key keeps its token and has an empty context.
  contexts, context_of, own = prompts.split_contexts(rest, keys, blocks=2)
  assert contexts == [[1, 2, 3], [7], [], [1, 2], [7, 8], []]
  np.testing.assert_array_equal(context_of, [0, 0, 1, 3, 4, 5])
  assert own == [[4], [5, 6], [8], [9], [9], [7]]
  with pytest.raises(ValueError, match='equal blocks'):
    prompts.split_contexts(rest, keys, blocks=4)


def test_packed_contexts_read_back_within_their_block():
  """Contexts packed end to end: each context's real slots are distinct packed tokens of its
  block's share, read back in order by start + slot, and modulo the share within the block
  (what a shard sees)."""
  contexts = [[1, 2, 3], [7], [], [1, 2], [7, 8], []]  # two blocks of three, as above
  ids, mask = prompts.left_padded(contexts, 0, 4)
  starts, total = prefix.pack_left_padded(mask, blocks=2)
  share = total // 2
  assert total == 2 * (4 + 4)  # each share: one width of unowned slots, then 4 real tokens
  packed = np.full(total, -1)
  for c in range(len(contexts)):
    places = starts[c] + np.arange(4)
    assert (places // share == c // 3).all()  # inside its own block's share
    assert (packed[places[mask[c]]] == -1).all()  # no real token shares a place
    packed[places[mask[c]]] = ids[c][mask[c]]
  for c in range(len(contexts)):
    local = packed[(c // 3) * share:(c // 3 + 1) * share]
    np.testing.assert_array_equal(local[starts[c] % share + np.arange(4)][mask[c]], contexts[c])
  with pytest.raises(ValueError, match='equal blocks'):
    prefix.pack_left_padded(mask, blocks=4)


def test_shared_contexts_give_the_answers_of_whole_prompts():
  """Caches of examples that share their text's tokens as one context answer as the same
  prompts cached whole: margins, the slot's prior and the step's gradient."""
  model, params = _tiny()
  rng = np.random.default_rng(4)
  texts = [list(rng.integers(5, TINY.vocab_size, rng.integers(3, 12))) for _ in range(4)]
  text_of = [0, 0, 1, 2, 2, 2, 3, 1, 0]
  rest = [[int(t) for t in texts[j]] + [int(t) for t in rng.integers(5, TINY.vocab_size,
                                                                     rng.integers(1, 4))]
          for j in text_of]
  rest.append([42])  # alone with its text, and one token: an empty context
  text_of.append(4)
  whole_ids, whole_mask = prompts.left_padded(rest, 0, 16)
  whole = prefix.prefix_caches(model, params, SHARED, whole_ids, whole_mask, chunk=4)
  contexts, context_of, own = prompts.split_contexts(rest, text_of)
  assert len(contexts) == 5 and contexts[4] == []
  ids, mask = prompts.left_padded(own, 0, prompts.OWN_PAD_AFTER_CONTEXT)
  ctx_ids, ctx_mask = prompts.left_padded(contexts, 0, 16)
  shared = prefix.prefix_caches(model, params, SHARED, ids, mask, chunk=4,
                                contexts=(ctx_ids, ctx_mask, context_of))
  # Packed: the contexts' real tokens and one width of slots before them, no padding.
  assert shared.context_k.shape[1] == ctx_mask.shape[1] + ctx_mask.sum()
  assert shared.context_valid.shape == (5, ctx_mask.shape[1])
  assert shared.valid.shape[1] == prompts.OWN_PAD_AFTER_CONTEXT
  np.testing.assert_allclose(shared.log_prior, whole.log_prior, atol=1e-4)
  idx = jnp.asarray([8, 0, 3, 9, 5, 6, 1])
  p = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, TINY.vocab_size)) * 3))

  def answers(caches, p):
    return prefix.answer_log_probs(model, params, caches.take(idx), p @ params['embed'],
                                   jnp.asarray([7, 8, 9], jnp.int32),
                                   jnp.asarray([YES, NO], jnp.int32), jnp.asarray(0.0), True)
  want, got = answers(whole, p), answers(shared, p)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert float(jnp.abs(want[:, 0] - want[:, 1]).std()) > 0.1  # the examples differ
  grad = lambda caches: jax.grad(lambda q: answers(caches, q)[:, 0].sum())(p)
  np.testing.assert_allclose(grad(shared), grad(whole), rtol=1e-3,
                             atol=1e-4 * float(jnp.abs(grad(whole)).max()))


def test_planted_label_is_found():
  """A feature planted on one token: the token whose effect on the answer varies most across
  examples (beyond what every label does) defines the targets, so it alone separates them (the
  rig is checked below); descent from a uniform p must end on it.

  A random tiny model is far more nonlinear in its input embedding than a trained LLM, and over
  its whole vocabulary mixtures of tokens have spurious optima (descent then settles on tokens
  with AUROC near 0.5); so the candidates are a dozen tokens, the plant among them.
  """
  model, params = _tiny(seed=1)
  n = 48
  ids, mask = _prefixes(n, seed=5)
  caches = prefix.prefix_caches(model, params, np.zeros(0, np.int32), ids, mask, chunk=16)
  tail = jnp.asarray([7, 8, 9], jnp.int32)

  @jax.jit
  @jax.vmap
  def margin(embedding):
    lp = prefix.answer_log_probs(model, params, caches.take(jnp.arange(n)), embedding[None],
                                     tail, jnp.asarray([YES, NO]), jnp.asarray(0.0), False)
    return lp[:, 0] - lp[:, 1]

  margins = np.asarray(margin(params['embed'][5:]))  # tokens 0-4 are disallowed below
  specific = margins - margins.mean(axis=0)
  plant = 5 + int(np.argmax(specific.std(axis=1)))
  targets = (specific[plant - 5] > np.median(specific[plant - 5])).astype(np.float32)
  aurocs = np.array([auroc(m, targets) for m in margins])
  candidates = np.random.default_rng(0).choice(
      [t for t in range(5, TINY.vocab_size) if t != plant], 11, replace=False).tolist() + [plant]
  allowed = np.zeros(TINY.vocab_size, bool)
  allowed[candidates] = True
  candidate_aurocs = aurocs[np.asarray(candidates) - 5]
  assert np.argmax(candidate_aurocs) == len(candidates) - 1
  assert np.sort(candidate_aurocs)[-2] < candidate_aurocs.max() - 0.1

  positives, negatives = np.flatnonzero(targets), np.flatnonzero(1 - targets)
  rng = np.random.default_rng(0)
  schedule = np.stack([np.concatenate([rng.choice(positives, 8, replace=False),
                                       rng.choice(negatives, 8, replace=False)])
                       for _ in range(150)])
  data = descent.DescentData(
      params=params, caches=caches, targets=jnp.asarray(targets),
      schedule=jnp.asarray(schedule, jnp.int32), tail_ids=tail,
      answer_ids=jnp.asarray([YES, NO], jnp.int32), allowed=jnp.asarray(allowed),
      mean_log_prior=caches.log_prior.mean(0))
  objective = Objective(model, LossWeights(1.0, 0.05, 50, 0.0), full_vocab_answer=False)
  optimizer = descent.make_optimizer(ConfigDict(dict(name='adam', lr=0.2, b1=0.9, b2=0.999)))
  label = label_lib.init_label(ConfigDict(dict(num_tokens=1, init='zeros', init_scale=1.0)),
                               TINY.vocab_size, jax.random.PRNGKey(0))
  state = descent.init_state(label, optimizer)
  step = descent.make_step(objective, optimizer)
  for _ in range(150):
    state, metrics = step(state, data)
  assert int(metrics['top_ids'][0]) == plant, (metrics['top_ids'], metrics['top_p'])
  assert float(metrics['top_p'][0]) > 0.5
  assert step._cache_size() == 1  # one compilation for all steps


def test_non_finite_step_keeps_state():
  model, params = _tiny()
  targets = np.array([1, 0] * 6, np.float32)
  data = _data(model, params, targets, np.arange(12)[None])
  objective = Objective(model, LossWeights(1.0, 0.0, 0, 0.0), temperature=0.0)  # 0/0 -> NaN
  optimizer = descent.make_optimizer(ConfigDict(dict(name='adam', lr=0.1, b1=0.9, b2=0.999)))
  label = {'logits': jnp.ones((1, TINY.vocab_size)), 'answer_bias': jnp.zeros(())}
  state = descent.init_state(label, optimizer)
  state, metrics = descent.make_step(objective, optimizer)(state, data)
  assert not bool(metrics['ok'])
  assert int(state['step']) == 0
  np.testing.assert_array_equal(state['label']['logits'], 1.0)


def test_planted_two_token_label_is_found():
  """A feature planted on a pair of tokens filling a two-token slot: descent over two
  distributions, two restarts as two rows of the engine's step, must recover the pair, in order,
  as the restart whose discrete label has the lowest training loss.

  The weights keep their small init scale here: with the 8x weights of the tests above, a
  two-token slot makes the random model so nonlinear in its input that descent settles in
  mixtures whose discrete labels score below chance, whatever the plant.
  """
  model, params = _tiny(seed=1)
  params = jax.tree.map(lambda x: x / 8 if x.ndim > 1 else x, params)
  n = 48
  ids, mask = _prefixes(n, seed=7)
  caches = prefix.prefix_caches(model, params, np.zeros(0, np.int32), ids, mask, chunk=16)
  tail = jnp.asarray([7, 8, 9], jnp.int32)
  answers = jnp.asarray([YES, NO], jnp.int32)
  candidates = np.random.default_rng(0).choice(np.arange(5, TINY.vocab_size), 12, replace=False)
  first, second = candidates[:6], candidates[6:]  # each position draws from its own six tokens
  pairs = np.array([(a, b) for a in first for b in second])

  @jax.jit
  @jax.vmap
  def margin(pair):
    lp = prefix.answer_log_probs(model, params, caches.take(jnp.arange(n)),
                                     params['embed'][pair], tail, answers, jnp.asarray(0.0), False)
    return lp[:, 0] - lp[:, 1]

  margins = np.asarray(margin(jnp.asarray(pairs)))
  specific = margins - margins.mean(axis=0)
  best = int(np.argmax(specific.std(axis=1)))
  plant = tuple(int(t) for t in pairs[best])
  targets = (specific[best] > np.median(specific[best])).astype(np.float32)
  aurocs = np.array([auroc(m, targets) for m in margins])
  assert np.argmax(aurocs) == best  # the rig: the plant alone separates the data best
  allowed = np.zeros((2, TINY.vocab_size), bool)
  allowed[0, first] = allowed[1, second] = True

  positives, negatives = np.flatnonzero(targets), np.flatnonzero(1 - targets)
  rng = np.random.default_rng(0)
  steps = 300
  schedule = np.stack([np.concatenate([rng.choice(positives, 8, replace=False),
                                       rng.choice(negatives, 8, replace=False)])
                       for _ in range(steps)])
  data = descent.DescentData(
      params=params, caches=caches, targets=jnp.asarray(targets),
      schedule=jnp.asarray(schedule, jnp.int32), tail_ids=tail, answer_ids=answers,
      allowed=jnp.asarray(allowed), mean_log_prior=caches.log_prior.mean(0))
  objective = Objective(model, LossWeights(1.0, 0.02, 100, 0.0), full_vocab_answer=False)
  optimizer = descent.make_optimizer(ConfigDict(dict(name='adam', lr=0.1, b1=0.9, b2=0.999)))
  restarts = 2
  labels = {'logits': jax.random.normal(jax.random.PRNGKey(0), (restarts, 2, TINY.vocab_size)),
            'answer_bias': jnp.zeros(restarts)}
  chained = optax.chain(optimizer, optax.scale(1.0))
  state = jax.vmap(lambda label: descent.init_state(label, chained))(labels)
  hp = {k: jnp.full(restarts, v, jnp.float32)
        for k, v in dict(lr=0.1, w_label=1.0, w_entropy=0.02, w_kl=0.0).items()}
  step = rows.make_rows_step(objective, optimizer, 0.1)
  data = data.replace(schedule=jnp.stack([data.schedule] * restarts),
                      mean_log_prior=jnp.stack([data.mean_log_prior] * restarts))
  for _ in range(steps):
    state, metrics = step(state, data, hp, jnp.ones(restarts, bool))
  assert step._cache_size() == 1
  found = [tuple(int(i) for i in row) for row in metrics['label_ids']]
  index = {tuple(int(t) for t in p): i for i, p in enumerate(pairs)}
  # The training loss of each restart's discrete label, with its best answer bias.
  signs = np.where(targets > 0.5, 1.0, -1.0)
  loss = lambda m: min(np.mean(np.logaddexp(0, -signs * (m + b))) for b in np.linspace(-5, 5, 201))
  chosen = min(found, key=lambda pair: loss(margins[index[pair]]))
  assert chosen == plant, (found, plant, metrics['label_p'])


def test_later_label_positions_take_the_prior_after_the_discrete_prefix():
  """KL of a two-token label: position 0 against the slot's mean prior, position 1 against the
  batch-mean next-token distribution after the first position's most probable token."""
  model, params = _tiny()
  targets = np.array([1, 0] * 4, np.float32)
  data = _data(model, params, targets, np.arange(8)[None])
  rng = np.random.default_rng(0)
  label = {'logits': jnp.asarray(rng.normal(size=(2, TINY.vocab_size)), jnp.float32),
           'answer_bias': jnp.zeros(())}
  objective = Objective(model, LossWeights(1.0, 0.0, 0, 1.0))
  idx = jnp.arange(8)
  _, m = objective(label, params, data.caches, idx, jnp.asarray(targets), data.tail_ids,
                   data.answer_ids, data.allowed, data.mean_log_prior, jnp.asarray(0))
  log_p = np.asarray(objective.log_p(label, data.allowed))
  p = np.exp(log_p)
  first = int(np.argmax(log_p[0]))
  # The model run on the full prompt [shared | prefix | first token], uncached.
  ids, mask = _prefixes(8)
  full = jnp.concatenate([jnp.broadcast_to(SHARED, (8, 4)), ids, jnp.full((8, 1), first)], 1)
  full_mask = jnp.concatenate([jnp.ones((8, 4), bool), mask, jnp.ones((8, 1), bool)], 1)
  logits, _ = model.apply({'params': params}, full, input_mask=full_mask)
  log_q1 = np.asarray(jax.nn.log_softmax(logits[:, -1])).mean(0)
  allowed = np.asarray(data.allowed)
  kl = lambda pk, lpk, lq: float(np.sum((pk * (lpk - lq))[allowed]))
  expected = 0.5 * (kl(p[0], log_p[0], np.asarray(data.mean_log_prior))
                    + kl(p[1], log_p[1], log_q1))
  np.testing.assert_allclose(float(m['kl']), expected, rtol=1e-4)


def test_contrast_baseline_is_subtracted_from_every_answer():
  """With a baseline β_i on the caches, the loss, the search's losses and every score use the
  margin less β_i; with none, the raw margin (the paper's)."""
  from tokenspace_jax.engine import scoring

  model, params = _tiny()
  targets = np.array([1, 0] * 6, np.float32)
  data = _data(model, params, targets, np.arange(12)[None] % 12)
  beta = jnp.asarray(np.random.default_rng(1).normal(size=12) * 2, jnp.float32)
  contrasted = data.caches.replace(baseline=beta)
  tail, answers = data.tail_ids, data.answer_ids
  raw = scoring.LabelScorer(model, params, data.caches, tail, answers, False, rows=8)
  scorer = scoring.LabelScorer(model, params, contrasted, tail, answers, False, rows=8)
  slots = np.arange(12)
  labels = [[20], [31], [40, 41]]
  np.testing.assert_allclose(scorer.margins(labels, slots),
                             raw.margins(labels, slots) - np.asarray(beta)[None], atol=1e-5)
  # Rows per pass (eval.batch_size) only chunk the work: the 24 one-token and 12 two-token label
  # rows in passes of 5 or 64, the last one padded, give the same margins.
  for per_pass in (5, 64):
    other = scoring.LabelScorer(model, params, contrasted, tail, answers, False, rows=per_pass)
    np.testing.assert_allclose(other.margins(labels, slots), scorer.margins(labels, slots),
                               atol=1e-5)
  # The binary loss: CE of sigmoid(raw margin + b - β_i), for a soft label and a learned b.
  objective = Objective(model, LossWeights(), full_vocab_answer=False)
  label = {'logits': jnp.asarray(np.random.default_rng(2).normal(size=(1, TINY.vocab_size))),
           'answer_bias': jnp.asarray(0.7)}
  idx = jnp.arange(12)
  args = (params, contrasted, idx, jnp.asarray(targets), tail, answers, data.allowed,
          data.mean_log_prior, jnp.asarray(0))
  _, metrics = objective(label, *args)
  emb = jnp.exp(objective.log_p(label, data.allowed)) @ params['embed']
  lp = prefix.answer_log_probs(model, params, data.caches.take(idx), emb, tail, answers,
                               jnp.zeros(()), False)
  z = lp[:, 0] - lp[:, 1] + 0.7 - beta
  expected = -jnp.mean(targets * jax.nn.log_sigmoid(z) + (1 - targets) * jax.nn.log_sigmoid(-z))
  np.testing.assert_allclose(metrics['answer_ce'], expected, rtol=1e-5)
  _, plain = objective(label, params, data.caches, *args[2:])
  assert abs(float(plain['answer_ce']) - float(expected)) > 1e-3


def test_contrast_labels_are_the_verdicts_random_labels_each_against_the_others():
  """The verdict's random labels are the first contrast labels; the margins the pool keeps for
  each (and the scorer returns instead of running it) are its raw margin less the mean of the
  *other* contrast labels', so no label is compared with a baseline that contains it."""
  import types

  from tokenspace_jax import config_defaults
  from tokenspace_jax.engine import pool, scoring

  class Words:
    def decode(self, ids):
      return ''.join('abcdefghij'[int(d)] for d in f'{int(ids[0]):04d}')

  allowed = np.ones(TINY.vocab_size, bool)
  config = config_defaults.get_base_config()
  for k in (1, 2):
    config.label.num_tokens = k
    scored = scoring.verdict_random_tokens(config, allowed, Words())
    for r in (3, config.eval.num_random + 2):
      config.contrast.labels = r
      contrast = pool.contrast_labels(config, Words(), allowed)
      assert len(contrast) == r and all(len(x) == k for x in contrast)
      flat = [i for x in contrast for i in x]
      n = min(len(flat), len(scored))
      assert flat[:n] == scored[:n]  # the same draw, in the same order

  config.label.num_tokens, config.contrast.labels, config.eval.num_random = 1, 4, 3
  config.eval.batch_size = 8
  model, params = _tiny()
  data = _data(model, params, np.array([1, 0] * 6, np.float32), np.arange(12)[None] % 12)
  lm = types.SimpleNamespace(model=model, params=params, tokenizer=Words())
  tail, answers = np.asarray(data.tail_ids), np.asarray(data.answer_ids)
  baseline, known = pool.contrast_baseline(config, lm, data.caches, tail, answers, allowed)
  labels = pool.contrast_labels(config, Words(), allowed)
  slots = np.arange(12)
  raw = scoring.LabelScorer(model, params, data.caches, tail, answers, True, rows=8)
  m = raw.margins(labels, slots)
  np.testing.assert_allclose(np.asarray(baseline), m.mean(0), atol=1e-5)
  contrasted = data.caches.replace(baseline=baseline)
  plain = scoring.LabelScorer(model, params, contrasted, tail, answers, True, rows=8)
  reuse = scoring.LabelScorer(model, params, contrasted, tail, answers, True, rows=8,
                              known=known)
  other = [[7]] if [7] not in labels else [[9]]
  got = reuse.margins(labels + other, slots[::2])
  for j in range(len(labels)):
    others = np.delete(m, j, axis=0).mean(0)
    np.testing.assert_allclose(got[j], (m[j] - others)[::2], atol=1e-4)
  # A label outside the contrast set is run, against the whole baseline.
  np.testing.assert_allclose(got[-1], plain.margins(other, slots[::2])[0], atol=1e-5)
  # Against the whole baseline, a contrast label's margin is the same up to a positive factor,
  # so its AUROC does not depend on which of the two it is scored by.
  np.testing.assert_allclose(plain.margins(labels, slots) * len(labels) / (len(labels) - 1),
                             reuse.margins(labels, slots), atol=1e-4)


def test_the_step_says_whether_the_candidate_set_changed():
  """``settled`` is True exactly when the update leaves the ``candidates`` most probable tokens
  of every position the same set (their order may change)."""
  model, params = _tiny()
  targets = np.array([1, 0] * 4, np.float32)
  data = _data(model, params, targets, np.arange(8)[None])
  objective = Objective(model, LossWeights(1.0, 0.0, 0, 0.0))
  rng = np.random.default_rng(0)
  seen = set()
  for lr in (1e-6, 3.0):
    optimizer = descent.make_optimizer(ConfigDict(dict(name='adam', lr=lr, b1=0.9, b2=0.999)))
    label = {'logits': jnp.asarray(rng.normal(size=(2, TINY.vocab_size)), jnp.float32),
             'answer_bias': jnp.zeros(())}
    top = lambda lab: [set(np.argsort(-np.asarray(row))[:6].tolist())
                       for row in objective.log_p(lab, data.allowed)]
    before = top(label)
    step = descent.make_step(objective, optimizer, candidates=6)
    new, metrics = step(descent.init_state(label, optimizer), data)
    same = top(new['label']) == before
    assert bool(metrics['settled']) == same
    seen.add(same)
  assert seen == {True, False}


def test_a_two_token_label_settles_only_with_the_same_most_probable_tokens():
  """A two-token label's candidates vary one position around the other's most probable token,
  so a swap of the top two at one position changes them; for one token it does not."""
  a, b, c = [5., 4., 0., 0., 0., 1.], [4., 5., 0., 0., 0., 1.], [0., 0., 3., 0., 0., 1.]
  log_p = lambda x: jax.nn.log_softmax(jnp.asarray(x), axis=-1)
  same = lambda x, y: bool(descent._same_candidates(log_p(x), log_p(y), 2))
  assert same([a], [b])  # one token: the same two candidates
  assert not same([a, c], [b, c])  # two tokens: position 1's candidates now follow token 1
  assert same([a, c], [[10., 4., 0., 0., 0., 1.], c])
  assert not same([a], [c])



def test_final_choice_screens_candidates_and_runs_each_pair_once():
  """Screened, every candidate is scored on the screen's examples and only each row's best
  (and its descent label) on the rest; a finalist's AUROC is the one it gets unscreened, and no
  (label, example) pair runs twice: not in the choice, nor when a finalist's margins on some of
  those examples (the calibration's) are asked for again."""
  from tokenspace_jax.engine import record, scoring
  from tokenspace_jax.engine.pool import stratified_pick

  model, params = _tiny()
  n, screen, keep = 24, 8, 2
  targets = np.array([1, 0] * (n // 2), np.float32)
  data = _data(model, params, targets, np.arange(n)[None] % n)
  scorer = lambda: scoring.LabelScorer(model, params, data.caches, data.tail_ids,
                                       data.answer_ids, False, rows=1)
  chooser = scoring.Split(slots=np.arange(n), targets=targets, windows=np.arange(n),
                          activations=targets.astype(np.float64))
  candidates = {0: [10, 11, 12, 13, 14, 15, [16, 17]], 1: [20, 12, 21, 22, 23]}
  key = scoring.label_key
  everyone = {key(c): c for cands in candidates.values() for c in cands}
  full, full_examples = record.final_choice(scorer(), candidates, chooser, 0, keep, seed=3)
  assert set(full_examples.values()) == {n} and set(full) == set(everyone)
  first = chooser.take(stratified_pick(targets, screen, 3))
  on_screen = dict(zip(everyone, scorer().training_aurocs(list(everyone.values()), first),
                       strict=True))

  screened = scorer()
  run, pairs = screened._margins, []  # rows=1: one call per pair
  screened.__dict__['_margins'] = lambda *a: pairs.append(1) or run(*a)
  got, examples = record.final_choice(screened, candidates, chooser, screen, keep, seed=3)
  expected = set()
  for cands in candidates.values():
    expected |= {key(cands[0])} | {key(c) for c in sorted(
        cands, key=lambda c: -on_screen[key(c)])[:keep]}
  finalists = {k for k, e in examples.items() if e == n}
  assert finalists == expected and set(examples) == set(everyone)
  assert all(examples[k] == screen for k in set(everyone) - finalists)
  for k in everyone:
    assert got[k] == pytest.approx(full[k] if k in finalists else on_screen[k], abs=1e-6)
  assert len(pairs) == len(everyone) * screen + len(finalists) * (n - screen)
  calibration = chooser.slots[::3]
  screened.margins([everyone[k] for k in finalists], calibration)
  assert len(pairs) == len(everyone) * screen + len(finalists) * (n - screen)


def test_runner_up_is_the_best_other_finalist_against_the_label_on_the_same_examples():
  """The record's runner-up: the best finalist after the chosen label, its training AUROC and
  the paired bootstrap interval of chosen minus it, from the choice's own margins (no pair runs
  again)."""
  from ml_collections import ConfigDict

  from tokenspace_jax.engine import record, scoring

  model, params = _tiny()
  n = 24
  targets = np.array([1, 0] * (n // 2), np.float32)
  data = _data(model, params, targets, np.arange(n)[None] % n)
  scorer = scoring.LabelScorer(model, params, data.caches, data.tail_ids, data.answer_ids,
                               False, rows=1)
  chooser = scoring.Split(slots=np.arange(n), targets=targets, windows=np.arange(n),
                          activations=targets.astype(np.float64))
  finalists = [10, 11, 12, 13, [14, 15]]
  train_auroc, _ = record.final_choice(scorer, {0: finalists}, chooser, 0, 1, seed=3)
  key = scoring.label_key
  ranked = sorted(finalists, key=lambda c: -train_auroc[key(c)])
  run, pairs = scorer._margins, []
  scorer.__dict__['_margins'] = lambda *a: pairs.append(1) or run(*a)
  config = ConfigDict({'eval': {'bootstrap': 200, 'confidence': 0.9}, 'seed': 0})
  for chosen, expected in ((ranked[0], ranked[1]), (ranked[1], ranked[0])):
    second = record.runner_up(scorer, chosen, finalists, train_auroc, chooser, config,
                              decode=str)
    assert second['token_id'] == record._label(expected) and second['token'] == str(expected)
    assert second['train_auroc'] == train_auroc[key(expected)]
    assert second['difference'] == pytest.approx(
        train_auroc[key(chosen)] - train_auroc[key(expected)])
    lo, hi = second['difference_interval']
    assert -1 <= lo <= hi <= 1 and lo < second['difference'] + 0.2
  assert not pairs
  assert record.runner_up(scorer, 10, [10], train_auroc, chooser, config, str) is None
