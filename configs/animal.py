"""Label the built-in `animal` feature on the embedded default model.

    python -m tokenspace_jax.main --config=configs/animal.py --workdir=workdirs/animal
    python -m tokenspace_jax.main --config=configs/animal.py:quick --workdir=/tmp/animal-quick

About 4 minutes on 2 CPU cores (237 s from model load to result, measured under a load
average of ~6 from other jobs).
Expected label: ' creature' (p 0.99, early stop at step 172; ' animal' leads on the way),
held-out AUROC 0.75 vs 0.70 for the reference ' animal' and 0.56 for random tokens.

Arguments (comma-separated): quick (20 steps, small splits), rating (the paper's zero-shot
chat rating prompt instead of the few-shot default).
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'animal'
  return common.apply_arg(c, arg)
