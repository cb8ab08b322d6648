"""Label the built-in `number` feature.

It fires on numerals and cardinal number words (ordinals, the pronoun "one", months and weekdays are
its hard negatives).

    python -m tokenspace_jax.main --config=configs/number.py --workdir=workdirs/number
    python -m tokenspace_jax.main --config=configs/number.py:quick --workdir=/tmp/number-quick

Runs on the embedded default model, SmolLM2-135M-Instruct, starting from the model's own guess
at the slot: there the final choice finds ` number` itself, in about 80 seconds on 2 CPU cores
(docs/results.md, "Which model each config uses"). `model=qwen2.5-coder-1.5b` as an argument
runs it on the offline Qwen2.5-Coder-1.5B with that model's prompt, which also finds ` number`
with a clearer held-out verdict, in about 26 minutes and 12 GB.

Arguments (comma-separated): quick (20 steps, small splits), rating (the paper's zero-shot
chat rating prompt instead of the few-shot default), model=NAME (docs/models.md), KEY=VALUE.
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'number'
  return common.apply_arg(c, arg)
