"""Llama in Flax, and loaders for the weights users have."""

from tokenspace_jax.models.config import LlamaConfig, RopeScaling, UnsupportedConfigError
from tokenspace_jax.models.generate import chat, chat_prompt_ids, greedy_generate
from tokenspace_jax.models.kv_cache import KVCache
from tokenspace_jax.models.llama import Llama
from tokenspace_jax.models.loading.errors import ModelLoadError, WeightFormatError
from tokenspace_jax.models.loading.load import LoadedModel, load_model, read_config

__all__ = ['KVCache', 'Llama', 'LlamaConfig', 'LoadedModel', 'ModelLoadError', 'RopeScaling',
           'UnsupportedConfigError', 'WeightFormatError', 'chat', 'chat_prompt_ids',
           'greedy_generate', 'load_model', 'read_config']
