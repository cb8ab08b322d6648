"""Label the built-in `mammal` feature on the embedded default model.

    python -m tokenspace_jax.main --config=configs/mammal.py --workdir=workdirs/mammal
    python -m tokenspace_jax.main --config=configs/mammal.py:quick --workdir=/tmp/mammal-quick

About 4 minutes on 2 CPU cores (202 s from model load to result, measured under a load
average of ~6 from other jobs).
Expected label: ' animal' (p 0.998, early stop at step 156): SmolLM2-135M cannot tell
mammals from other animals whatever the concept, and ' animal' scores above ' mammal'
(held-out AUROC 0.60 vs 0.54; random tokens 0.48).

Arguments (comma-separated): quick (20 steps, small splits), rating (the paper's zero-shot
chat rating prompt instead of the few-shot default).
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'mammal'
  return common.apply_arg(c, arg)
