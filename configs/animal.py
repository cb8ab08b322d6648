"""Label the built-in `animal` feature on the embedded default model.

    python -m tokenspace_jax.main --config=configs/animal.py --workdir=workdirs/animal
    python -m tokenspace_jax.main --config=configs/animal.py:quick --workdir=/tmp/animal-quick

Expected on 2 CPU cores: TBD. Expected label: TBD.
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'animal'
  return common.apply_arg(c, arg)
