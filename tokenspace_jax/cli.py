"""What the commands share: the --config and --workdir flags, and one-line error reporting."""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                          lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (default: under workdirs/).')


def user_errors() -> tuple:
  """Errors whose message already says what is wrong and how to fix it: shown in one line."""
  from tokenspace_jax.classifier.label import LabelError
  from tokenspace_jax.classifier.prompts import PromptError
  from tokenspace_jax.config_defaults import ConfigValueError
  from tokenspace_jax.engine.loop import NonFiniteLossError
  from tokenspace_jax.features import FeatureError
  from tokenspace_jax.models import ModelLoadError, UnsupportedConfigError
  from tokenspace_jax.models.default import DefaultModelMissingError
  from tokenspace_jax.outputs.storage import StorageError
  from tokenspace_jax.outputs.workdir import WorkdirError
  from tokenspace_jax.parallel.distributed import DistributedSetupError
  return (FeatureError, LabelError, ModelLoadError, UnsupportedConfigError, PromptError,
          DefaultModelMissingError, ConfigValueError, NonFiniteLossError, WorkdirError,
          StorageError, DistributedSetupError)


def run_reporting_errors(fn, *args):
  """(``fn(*args)``, 0), or (None, exit code) after a user error or an interruption, reported
  in one line without a traceback (143 for SIGTERM/Ctrl-C: rerun the same command to resume)."""
  from tokenspace_jax.engine.loop import RunInterrupted
  try:
    return fn(*args), 0
  except user_errors() as e:
    print(f'error: {e}', file=sys.stderr)
    return None, 1
  except RunInterrupted as e:
    print(str(e), file=sys.stderr)
    return None, 143


def config_from_flags(argv, example: str):
  """The ``--config`` of the command line, or None after printing why there is none."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError(f'--config is required, e.g. --config={example}')
  try:
    config.get('seed')  # a config file that failed to load raises on first access
  except OSError as e:
    print(f'error: {str(e).strip()}', file=sys.stderr)
    return None
  return config


def use_compilation_cache(workdir: str) -> str | None:
  """Keeps JAX's compiled programs in ``workdir/compilation_cache``, unless
  JAX_COMPILATION_CACHE_DIR names another place; returns the folder used, or None.

  A run resumed after a kill or a preemption then loads its compiled step, scorer and prefix
  passes instead of compiling them again (minutes for a large model on a TPU; docs/robustness.md
  has a small model's figure on CPU). Call it before anything compiles: JAX reads the setting
  once. A folder that cannot be made leaves the cache off, so the workdir's own check reports
  the problem in one line."""
  import jax

  if not jax.config.jax_compilation_cache_dir:
    folder = os.path.abspath(os.path.join(workdir, 'compilation_cache'))
    try:
      os.makedirs(folder, exist_ok=True)
    except OSError as e:
      logging.getLogger('tokenspace_jax').warning('No compilation cache (%s): %s', folder, e)
      return None
    jax.config.update('jax_compilation_cache_dir', folder)
  return jax.config.jax_compilation_cache_dir


def config_filename() -> str:
  return getattr(flags.FLAGS['config'], 'config_filename', '')


def parse_flags(argv):
  """absl's parser, with bad ``--config`` files, arguments and overrides reported in one line,
  not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    detail = str(e).strip('"\'').replace("\\'", "'").replace('\\n', ' ')
    bad = [a for a in argv[1:] if a.startswith('--config')]
    print(f'error: invalid config or override {bad}: {detail}\n'
          'Overrides must name existing keys with values of their type, e.g. '
          '--config.optim.lr=0.3 (see docs/configuration.md).', file=sys.stderr)
    sys.exit(2)


def start(main):
  """Runs ``main(argv) -> exit code`` as an absl app with the parser above."""
  import logging

  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
