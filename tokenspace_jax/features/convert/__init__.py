"""Importers: other tools' SAE-feature data to this project's activation-records files.

    python -m tokenspace_jax.features.convert --from=openai|delphi|delphi-scores|neuronpedia \\
        IN... --out=records.jsonl

writes records (:mod:`tokenspace_jax.features.records`) with a ``feature_id`` and a ``source``
naming the feature in its tool's terms, ready for ``tokenspace_jax.batch``
(``--config.features=``) or, one feature at a time, ``tokenspace_jax.main``
(``--config.feature.records=``). The same importers from Python return a :class:`Conversion`:
iterate it for the records, or pass it to :func:`write_records`; its ``report`` says what was
skipped and why, by feature and record, and which features came with a caveat.

=================  ==========================================================================
``openai``         OpenAI automated-interpretability ``NeuronRecord`` JSON files
``delphi``         delphi's latent cache (``latents/{hookpoint}/{start}_{end}.safetensors``)
``delphi_scores``  delphi's scored examples (``scores/{scorer}/{hookpoint}_latent{i}.txt``)
``neuronpedia``    Neuronpedia's feature API JSON and bulk exports (``batch-N.jsonl.gz``)
``records_from_arrays``  activations in memory, e.g. SAELens' ``sae.encode(cache[hook])``
=================  ==========================================================================
"""

from tokenspace_jax.features.convert.from_arrays import records_from_arrays
from tokenspace_jax.features.convert.from_delphi_cache import delphi
from tokenspace_jax.features.convert.from_delphi_scores import delphi_scores
from tokenspace_jax.features.convert.from_neuronpedia import neuronpedia
from tokenspace_jax.features.convert.from_openai import openai
from tokenspace_jax.features.convert.report import Conversion, Report, Skip, write_records

FORMATS = {'openai': openai, 'delphi': delphi, 'delphi-scores': delphi_scores,
           'neuronpedia': neuronpedia}

__all__ = ['FORMATS', 'Conversion', 'Report', 'Skip', 'delphi', 'delphi_scores', 'neuronpedia',
           'openai', 'records_from_arrays', 'write_records']
