"""Tokenizers from transformers, for HF folders and for GGUF files (transformers reads both)."""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
  """The tokenizer of an HF folder or a ``.gguf`` file, with the model's chat template."""
  if path.endswith('.gguf'):
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                        gguf_file=os.path.basename(path))
  else:
    tok = AutoTokenizer.from_pretrained(path)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok
