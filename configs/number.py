"""Label the built-in `number` feature.

It fires on numerals and cardinal number words (ordinals, the pronoun "one", months and weekdays are
its hard negatives).

    python -m tokenspace_jax.main --config=configs/number.py --workdir=workdirs/number
    python -m tokenspace_jax.main --config=configs/number.py:quick --workdir=/tmp/number-quick

Runs on Qwen2.5-Coder-1.5B-Instruct with its prompt and its label start (the
`qwen2.5-coder-1.5b` entry of config_defaults.MODEL_DEFAULTS): there it finds ` number`
itself, where the embedded SmolLM2-135M finds only ` factor` (docs/results.md, "Which model
each config uses"). It takes about 26 minutes and 12 GB on 2 CPU cores against about 2 minutes
on SmolLM2; `model=smollm2-135m` (or `model=qwen2.5-coder-0.5b`) as an argument runs it on a
smaller offline model with that model's prompt. A `--config.model.source=` folder keeps the
1.5B model's prompt and start; add `:fewshot,label.init=zeros` for the general defaults.

Arguments (comma-separated): quick (20 steps, small splits), rating (the paper's zero-shot
chat rating prompt instead of the few-shot default), model=NAME (docs/models.md), KEY=VALUE.
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'number'
  return common.apply_arg(c, ','.join(filter(None, ['model=qwen2.5-coder-1.5b', arg])))
