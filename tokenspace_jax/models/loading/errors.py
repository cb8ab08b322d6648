"""Errors a user can act on: each names the file and the problem, never a deep traceback."""


class ModelLoadError(ValueError):
  """A model source could not be read; the message says which file and why."""


class WeightFormatError(ModelLoadError):
  """A weights file is truncated, malformed or holds tensors we cannot map."""
