"""Label the built-in `chinese` feature on the embedded default model.

    python -m tokenspace_jax.main --config=configs/chinese.py --workdir=workdirs/chinese
    python -m tokenspace_jax.main --config=configs/chinese.py:quick --workdir=/tmp/chinese-quick

About 6-7 minutes on 2 CPU cores (380 s from model load to result, measured under
a load average of ~6 from other jobs; about half that on an idle machine).
Expected result: NOT IDENTIFIABLE. Descent converges (to ' environment'), but random
tokens separate Chinese from Japanese/Korean/English words about as well as ' Chinese'
does (held-out AUROC 0.60 vs 0.64), and the run says so. See docs/results.md.

Arguments (comma-separated): quick (20 steps, small splits), rating (the paper's zero-shot
chat rating prompt instead of the few-shot default).
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'chinese'
  return common.apply_arg(c, arg)
