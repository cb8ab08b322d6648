"""Label the built-in `chinese` feature on the embedded default model.

    python -m tokenspace_jax.main --config=configs/chinese.py --workdir=workdirs/chinese
    python -m tokenspace_jax.main --config=configs/chinese.py:quick --workdir=/tmp/chinese-quick

Expected on 2 CPU cores: TBD. Expected label: TBD.
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'chinese'
  return common.apply_arg(c, arg)
