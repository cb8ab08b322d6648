"""Label the built-in `mammal` feature on the embedded default model.

    python -m tokenspace_jax.main --config=configs/mammal.py --workdir=workdirs/mammal
    python -m tokenspace_jax.main --config=configs/mammal.py:quick --workdir=/tmp/mammal-quick

Expected on 2 CPU cores: TBD. Expected label: TBD.
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'mammal'
  return common.apply_arg(c, arg)
