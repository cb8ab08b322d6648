"""Label every feature of an activation-records file, several features per descent step.

    python -m tokenspace_jax.features.synthetic_records /tmp/four_features.jsonl
    python -m tokenspace_jax.batch --config=configs/batch.py \\
        --config.features=/tmp/four_features.jsonl --workdir=workdirs/batch-four

The first command writes the four built-in features (chinese, animal, mammal, number) as one
records file: 918 records, each feature's reference word included, its hard negatives not (an
SAE dump does not mark them). On the embedded default model the second took 11 minutes on 2 CPU
cores (654 s, under a load average of ~5 from other jobs; peak memory 6.1 GB) and wrote
workdirs/batch-four/labels.jsonl with, per feature (held-out AUROC found / reference / random
mean):

  chinese  ' emotion'  p 0.54  300 steps   0.41 / 0.50 / 0.43  not identifiable
  animal   ' creature' p 0.99  173 steps   0.64 / 0.60 / 0.53  identifiable
  mammal   ' animal'   p 1.00  158 steps   0.55 / 0.54 / 0.44  not identifiable (near chance)
  number   ' book'     p 1.00  165 steps   0.65 / 0.68 / 0.65  not identifiable

animal and mammal end where their single runs do (docs/results.md: ' creature' at step 172,
' animal' at 156); the scores differ because the records split and sample the data differently.
Each feature's 320 examples hold about 1 GB of prefix caches (float32): the default of 2
features per step is what was measured here; raise batch.features_per_step where memory allows
(4 were killed for memory on this 23 GB machine while other jobs ran, before the caches were
built in place rather than concatenated).

Rerun the same command after a kill (SIGTERM, Ctrl-C) to resume; tokenspace_jax/batch.py says
what the workdir holds. Arguments (comma-separated): quick (20 steps, small splits), rating
(the paper's zero-shot chat rating prompt instead of the few-shot default).
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
