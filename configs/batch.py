"""Label every feature of an activation-records file, several features per descent step.

    python -m tokenspace_jax.features.synthetic_records /tmp/four_features.jsonl
    python -m tokenspace_jax.batch --config=configs/batch.py \\
        --config.features=/tmp/four_features.jsonl --workdir=workdirs/batch-four

The first command writes the four built-in features (chinese, animal, mammal, number) as one
records file, each feature's reference word included, its hard negatives not (an SAE dump does
not mark them). The second labels them `batch.features_per_step` at a time and appends one line
per feature to workdirs/batch-four/labels.jsonl. Its labels, times and peak memory on this
project's machines are in docs/scaling.md; each feature's prefix caches take memory in
proportion to its examples, so lower `batch.features_per_step` where memory is short.

Rerun the same command after a kill (SIGTERM, Ctrl-C) to resume; tokenspace_jax/batch.py says
what the workdir holds. `--config.batch.shard=i --config.batch.num_shards=n` gives worker i its
fixed slice of the features (docs/scaling.md). Arguments (comma-separated): quick (20 steps,
small splits), rating (the paper's zero-shot chat rating prompt instead of the few-shot default),
model=NAME, KEY=VALUE.
"""

from ml_collections import ConfigDict

from tokenspace_jax import config_defaults as common


def get_config(arg=None):
  c = common.get_base_config()
  c.progress = False  # one bar per group would flood a log of thousands of features
  c.batch = ConfigDict()
  c.batch.features = ''  # activation-records .jsonl with a "feature_id" in every record
  c.batch.features_per_step = 2  # features descended together in one vmapped step
  c.batch.shard = 0  # this worker's index, when several machines split the file ...
  c.batch.num_shards = 1  # ... into this many slices (features shard, shard + n, ...)
  c.features = c.batch.get_ref('features')  # batch.features, as --config.features=FILE.jsonl
  return common.apply_arg(c, arg)
