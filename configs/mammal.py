"""Label the built-in `mammal` feature.

It fires on words naming mammals (birds, fish, insects, reptiles and amphibians are its hard
negatives).

    python -m tokenspace_jax.main --config=configs/mammal.py --workdir=workdirs/mammal
    python -m tokenspace_jax.main --config=configs/mammal.py:quick --workdir=/tmp/mammal-quick

Runs on Qwen2.5-Coder-1.5B-Instruct with its prompt (the
`qwen2.5-coder-1.5b` entry of config_defaults.MODEL_PROMPTS): there it finds the paper's own
` mamm`, where the embedded SmolLM2-135M finds only the broader ` animal` (docs/results.md,
"Which model each config uses"). It takes about 16 minutes and 12 GB on 2 CPU cores against
about 65 seconds on SmolLM2; `model=smollm2-135m` (or `model=qwen2.5-coder-0.5b`) as an
argument runs it on a smaller offline model with that model's prompt. A
`--config.model.source=` folder keeps the 1.5B model's prompt; add `:fewshot` for the
general prompt.

Arguments (comma-separated): quick (20 steps, small splits), rating (the paper's zero-shot
chat rating prompt instead of the few-shot default), model=NAME (docs/models.md), KEY=VALUE.
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'mammal'
  return common.apply_arg(c, ','.join(filter(None, ['model=qwen2.5-coder-1.5b', arg])))
