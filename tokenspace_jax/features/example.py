"""The unit of labeling data: one word of one text, and whether the feature fires on it.

The labeler asks a frozen LLM "does *this word of this text* match concept X?", so an example
must carry the whole text (the context the LLM reads) and the character span of the word (what the
question points at), not a bare string. Character spans rather than token indices keep the data
independent of any tokenizer: the model side re-tokenizes and locates the span itself.
"""

from __future__ import annotations

import dataclasses


class FeatureError(ValueError):
  """Bad feature data or arguments; the message names the problem and how to fix it.

  One exception type for the whole package lets callers (CLIs, batch jobs) catch every
  user-facing data problem without also swallowing programming errors.
  """


class FeatureFileNotFoundError(FeatureError, FileNotFoundError):
  """A data file does not exist; also a ``FileNotFoundError`` so generic handlers still work."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One word (character span ``[start, end)`` of ``text``) and the feature's verdict on it.

  ``activation`` keeps the raw value so thresholds can be revisited without reloading, while
  ``target`` is what training uses. ``hard_negative`` marks deliberately confusable negatives so
  evaluations can report how a label does on exactly the cases that separate good labels from
  merely plausible ones. ``window`` numbers the text the example came from (a record's window,
  a synthetic sentence), unique within a feature, so a scorer can also ask the question SAE
  tools ask of a whole text: does this window hold a positive?
  """

  text: str
  start: int
  end: int
  target: float
  activation: float
  hard_negative: bool = False
  window: int = 0

  @property
  def word(self) -> str:
    return self.text[self.start:self.end]


@dataclasses.dataclass(frozen=True)
class Feature:
  """A feature to label: its examples, split once so held-out scores mean something.

  ``reference_word`` is the human label, kept so experiments can check whether the optimized
  label recovers it; it is never shown to the optimizer. ``meta`` carries what the records said
  about the feature beyond its examples: ``source`` (the tool's own name for it, so exports can
  address it there) and ``explanation`` (a tool's sentence describing it, which is not a word
  and so not a reference word).
  """

  name: str
  reference_word: str
  train: tuple[Example, ...]
  heldout: tuple[Example, ...]
  description: str = ''
  meta: dict = dataclasses.field(default_factory=dict, hash=False)
