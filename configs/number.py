"""Label the built-in `number` feature on the embedded default model.

    python -m tokenspace_jax.main --config=configs/number.py --workdir=workdirs/number
    python -m tokenspace_jax.main --config=configs/number.py:quick --workdir=/tmp/number-quick

About 4-5 minutes on 2 CPU cores (measured under a load average of ~6 from other jobs).
Expected result: NOT IDENTIFIABLE. Every label, random ones included, lets the model pick
out numerals about equally well (held-out AUROC 0.62-0.67); the run says so.

Arguments (comma-separated): quick (20 steps, small splits), rating (the paper's zero-shot
chat rating prompt instead of the few-shot default).
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'number'
  return common.apply_arg(c, arg)
