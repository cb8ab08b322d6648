"""Label the built-in `chinese` feature on the embedded default model.

    python -m tokenspace_jax.main --config=configs/chinese.py --workdir=workdirs/chinese
    python -m tokenspace_jax.main --config=configs/chinese.py:quick --workdir=/tmp/chinese-quick

179 s from model load to result on 2 CPU cores (model 10.5 s, prompt caches 43 s, 276 steps
of descent 125 s with a 3.8 s compile, evaluation 16 s), 3 min 21 s for the whole command with
Python and JAX start-up; measured while another labeling job shared the cores (load 2-4).
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
