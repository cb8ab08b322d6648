"""The embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own GGUF load.

Both sides dequantize the same file, so they should agree to float32 rounding; a mismatch means
our GGUF reading (the Q/K un-permute, tied head, metadata) or the forward pass is wrong on a real
model, which the tiny random models could miss.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tokenspace_jax.models import chat, chat_prompt_ids, greedy_generate

TEXT = """\
The lighthouse stood at the end of a narrow spit of rock, and for most of the nineteenth century \
it was kept by a single family. Each evening the keeper climbed the spiral stair, trimmed the \
wicks, polished the great lens, and wound the clockwork that turned it through the night. Ships \
passing the headland counted the flashes to know which light they saw, because every lighthouse \
on the coast had its own rhythm.

In winter the storms came from the west. Waves broke over the gallery, salt crusted the windows, \
and supplies could not be landed for weeks at a time. The keeper's log records the weather every \
four hours, the ships sighted, the oil burned, and now and then a short line about the children \
or a visit from the inspector, who arrived by boat when the sea allowed it.

When the light was electrified in 1921 the clockwork was kept as a spare, and when it was finally \
automated the family moved to the mainland. The log books went to the county archive, where \
historians have used them to reconstruct a century of weather, shipping and daily life on a \
remote shore. The tower itself is now a small museum, and on clear nights the old lens still \
turns, though no keeper climbs the stair to tend it.
"""
QUESTION = 'Summarize this text in three sentences, then say what the log books were used for.'


@pytest.fixture(scope='module')
def hf_default(default_model):
  from transformers import AutoModelForCausalLM

  path = default_model.path
  model = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope='module')
def prompt_ids(default_model):
  ids = chat_prompt_ids(default_model.tokenizer, f'{TEXT}\n{QUESTION}')
  assert 280 <= len(ids) <= 400, len(ids)
  return ids


def test_logits_match_transformers_gguf_load(default_model, hf_default, prompt_ids):
  m = default_model
  forward = jax.jit(lambda p, t: m.model.apply({'params': p}, t)[0])
  ours = np.asarray(forward(m.params, jnp.asarray([prompt_ids], jnp.int32)))[0]
  with torch.no_grad():
    ref = hf_default(torch.tensor([prompt_ids])).logits[0].numpy()
  assert ours.shape == ref.shape == (len(prompt_ids), m.config.vocab_size)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
  assert np.abs(ours - ref).max() <= 1e-3


def test_greedy_generation_matches_transformers(default_model, hf_default, prompt_ids):
  m = default_model
  (ours,) = greedy_generate(m.model, m.params, m.tokenizer, [prompt_ids], max_new_tokens=20)
  with torch.no_grad():
    out = hf_default.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(
        1, len(prompt_ids), dtype=torch.long), max_new_tokens=20, do_sample=False,
                              eos_token_id=m.tokenizer.eos_token_id)
  ref = out[0, len(prompt_ids):].tolist()
  assert len(ours) == 20, m.tokenizer.decode(ours)  # a 3-sentence summary outlasts 20 tokens
  assert ours == ref, (m.tokenizer.decode(ours), m.tokenizer.decode(ref))


def test_chat_answers_sensibly(default_model):
  answer = chat(default_model, 'What is the capital of France?', max_new_tokens=12)
  assert 'Paris' in answer, answer
