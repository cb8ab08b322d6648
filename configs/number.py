"""Label the built-in `number` feature on the embedded default model.

    python -m tokenspace_jax.main --config=configs/number.py --workdir=workdirs/number
    python -m tokenspace_jax.main --config=configs/number.py:quick --workdir=/tmp/number-quick

Expected on 2 CPU cores: TBD. Expected label: TBD.
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'number'
  return common.apply_arg(c, arg)
