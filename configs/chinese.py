"""Label the built-in `chinese` feature.

It fires on Chinese words (Japanese and Korean words are its hard negatives).

    python -m tokenspace_jax.main --config=configs/chinese.py --workdir=workdirs/chinese
    python -m tokenspace_jax.main --config=configs/chinese.py:quick --workdir=/tmp/chinese-quick

Runs on Qwen2.5-Coder-1.5B-Instruct with its prompt and a note on each text's language
(`question_note_chat`: the judge is first asked which language each text is written in, and
its answer follows the text in every prompt). Asked about one word, that model calls Japanese
words in kanji Chinese; told the text's language, it sets them apart, and the run ends on
` Chinese` (docs/results.md, "Which model each config uses"). It takes about 17 minutes and
11 GB on 2 CPU cores; `model=smollm2-135m` (or `model=qwen2.5-coder-0.5b`) as an argument runs
it on a smaller offline model with that model's prompt, where no label names Chinese.

Arguments (comma-separated): quick (20 steps, small splits), rating (the paper's zero-shot
chat rating prompt), model=NAME (docs/models.md), a prompt preset, KEY=VALUE.
"""

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.feature.name = 'chinese'
  return common.apply_arg(
      c, ','.join(filter(None, ['model=qwen2.5-coder-1.5b', 'question_note_chat', arg])))
