"""Label one feature: ``python -m tokenspace_jax.main --config=configs/chinese.py [--workdir=DIR]``.

Overrides: ``--config.optim.lr=0.3``. Rerunning with the same workdir resumes from its latest
checkpoint. Only wiring lives here; the work is in ``tokenspace_jax.labeling``.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from tokenspace_jax import labeling, sweep
from tokenspace_jax.classifier.label import LabelError
from tokenspace_jax.classifier.prompts import PromptError
from tokenspace_jax.features import FeatureError
from tokenspace_jax.models import ModelLoadError, UnsupportedConfigError
from tokenspace_jax.models.default import DefaultModelMissingError
from tokenspace_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (default: workdirs/<feature>).')

# Errors whose message already says what is wrong and how to fix it: shown without a traceback.
USER_ERRORS = (FeatureError, LabelError, ModelLoadError, UnsupportedConfigError, PromptError,
               DefaultModelMissingError, labeling.ConfigMismatchError, labeling.ConfigValueError,
               labeling.NonFiniteLossError, distributed.DistributedSetupError)


def run_reporting_errors(fn, *args, errors: tuple = USER_ERRORS):
  """(``fn(*args)``, 0), or (None, exit code) after a user error or an interruption, reported
  in one line without a traceback (143 for SIGTERM/Ctrl-C: rerun the same command to resume)."""
  try:
    return fn(*args), 0
  except errors as e:
    print(f'error: {e}', file=sys.stderr)
    return None, 1
  except labeling.RunInterrupted as e:
    print(str(e), file=sys.stderr)
    return None, 143


def _label(config, workdir: str):
  # Before anything touches a device: joins the other hosts of a pod slice (auto-detected on
  # Cloud TPU, or from JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID); a no-op on a
  # single machine.
  distributed.initialize()
  if sweep.is_sweep(config):  # several label rows in one run: a sweep.json, not result.json
    return sweep.run(config, workdir)
  return labeling.run(config, workdir)


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


def main(argv):
  config = config_from_flags(argv, 'configs/chinese.py')
  if config is None:
    return 2
  name = config.feature.name or os.path.splitext(os.path.basename(config.feature.records))[0]
  workdir = _WORKDIR.value or os.path.join('workdirs', name or 'run')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
  logging.getLogger('absl').setLevel(logging.WARNING)
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  logging.info('Config %s, overrides %s, workdir %s\n%s', flags.FLAGS['config'].config_filename
               if hasattr(flags.FLAGS['config'], 'config_filename') else '', overrides, workdir,
               config)
  result, code = run_reporting_errors(_label, config, workdir)
  if code or not distributed.is_main_process():
    return code
  if sweep.is_sweep(config):
    print(sweep.summary(result))
    print(f'Wrote {os.path.join(workdir, "sweep.json")}')
    return 0
  print(labeling.summary(result))
  print(f'Wrote {os.path.join(workdir, "result.json")} and trajectory.png')
  return 0


def _parse_flags(argv):
  """absl's parser, with bad ``--config.*`` overrides reported in one line, not a traceback."""
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
          '--config.optim.lr=0.3 (see tokenspace_jax/config_defaults.py).', file=sys.stderr)
    sys.exit(2)


def run():
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
