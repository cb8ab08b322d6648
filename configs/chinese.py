"""Label the built-in `chinese` feature.

It fires on Chinese words (Japanese and Korean words are its hard negatives).

    python -m tokenspace_jax.main --config=configs/chinese.py --workdir=workdirs/chinese
    python -m tokenspace_jax.main --config=configs/chinese.py:quick --workdir=/tmp/chinese-quick

Runs on the embedded default model, SmolLM2-135M-Instruct; `model=qwen2.5-coder-0.5b` (or
-1.5b) as an argument runs it on a larger offline model with that model's prompt. What each
model labels this feature as, how sure the verdict is and how long it takes are measured in
docs/results.md, with the commands.

Arguments (comma-separated): quick (20 steps, small splits), rating (the paper's zero-shot
chat rating prompt instead of the few-shot default), model=NAME (docs/models.md), KEY=VALUE.
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'chinese'
  return common.apply_arg(c, arg)
