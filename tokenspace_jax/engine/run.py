"""The engine's one entry: label rows over a pool of features, from caches to records; and the
steps every command takes before it (the mesh, the model, the inputs' fingerprints).

``label_features`` is what every command runs, at its own size: ``main`` with one feature (one
row, or the rows of a sweep), the batch job with a group of ``batch.features_per_step``
features at a time. It builds the pool, the rows and the step, resumes from the checkpoint
directory it is given, descends, and scores; the command decides what to write.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from tokenspace_jax.classifier import label as label_lib
from tokenspace_jax.classifier.objective import objective_from_config
from tokenspace_jax.config_defaults import ConfigValueError
from tokenspace_jax.engine import descent, loop, record, rows, scoring, search
from tokenspace_jax.engine.pool import Pool, build_pool
from tokenspace_jax.features import Feature
from tokenspace_jax.models import LoadedModel, load_model
from tokenspace_jax.models.loading.param_mapping import abstract_params
from tokenspace_jax.outputs import checkpoint
from tokenspace_jax.outputs.checkpoint import Checkpointer, StopFlag
from tokenspace_jax.outputs.report import Trajectory
from tokenspace_jax.outputs.workdir import fingerprint_file, fingerprint_model
from tokenspace_jax.parallel import sharding

log = logging.getLogger('tokenspace_jax')


def run_mesh(config: ConfigDict) -> jax.sharding.Mesh:
  """The mesh of ``config.mesh`` over every device of the job."""
  try:
    return sharding.make_mesh(config.mesh)
  except sharding.MeshError as e:
    raise ConfigValueError(f'{e} (config.mesh).') from None


def load_for(config: ConfigDict, mesh: jax.sharding.Mesh | None) -> LoadedModel:
  """The model of ``config.model``, its weights loaded straight into their shardings."""
  shardings = ((lambda model: sharding.param_shardings(abstract_params(model), mesh))
               if mesh is not None and mesh.size > 1 else None)
  lm = load_model(config.model.source, dtype=jnp.dtype(config.model.dtype), shardings=shardings,
                  param_dtype=jnp.dtype(config.model.param_dtype or config.model.dtype))
  log.info('Loaded %s in %.1f s.', lm.path, lm.load_seconds)
  return lm


def inputs_of(config: ConfigDict) -> dict:
  """Fingerprints of the files a run reads besides its config and model: a changed input is a
  new run."""
  return ({'feature.records': fingerprint_file(config.feature.records)}
          if config.feature.records else {})


def with_model(inputs: dict, config: ConfigDict, lm: LoadedModel) -> dict:
  return {**inputs, 'model': fingerprint_model(config.model.source, lm.path)}


def default_workdir(config: ConfigDict) -> str:
  """``workdirs/NAME`` for the feature's name (or the records file's); refused where the name
  is no plain folder name, which would put the workdir elsewhere (``../../x``, ``/x``)."""
  name = config.feature.name or os.path.splitext(os.path.basename(config.feature.records))[0]
  if name in ('.', '..') or any(sep and sep in name for sep in ('/', os.sep, os.altsep)):
    raise ConfigValueError(
        f'feature.name={name!r} is no folder name for the default workdir under workdirs/; '
        'pass --workdir=DIR, or a feature.name without "/".')
  return os.path.join('workdirs', name or 'run')


@dataclasses.dataclass
class Labeled:
  records: list[dict]  # one per row, in row order (feature-major)
  specs: list[rows.RowSpec]
  pool: Pool
  loop: loop.LoopResult
  trajectory: list[dict]
  resumed_at: int | None
  seconds: dict  # pool, descent, compile, scoring


@dataclasses.dataclass
class Descent:
  """What stepping a pool's rows needs: the jitted step and its arguments."""

  specs: list[rows.RowSpec]
  step: object  # step(state['rows'], data, hp, active)
  state: dict  # loop.initial_state's
  data: object  # DescentData of every row
  hp: dict
  search: object | None
  select: object  # select(rows, idx): the rows, data and hp of rows idx (loop.descend)


def settle_rule(config: ConfigDict) -> tuple[int, int]:
  """(candidates the step compares, steps they must hold) of ``early_stop.settled``; (0, 0),
  the rule off, when it is 0 or there is no final choice (``choice.top_k=0``) to wait for."""
  if not (config.early_stop.settled and config.choice.top_k):
    return 0, 0
  return config.choice.top_k, config.early_stop.settled


def prepare_descent(config: ConfigDict, lm: LoadedModel, pool: Pool) -> Descent:
  """The rows of ``config`` over ``pool``: their initial state, data and step, on the mesh."""
  specs = rows.row_specs(config, len(pool.features))
  objective = objective_from_config(config, lm.model)
  optimizer = descent.make_optimizer(config.optim)
  word_id = (label_lib.token_id_for_word(lm.tokenizer, config.label.init_word)
             if config.label.init == 'word' else None)
  state = loop.initial_state(rows.init_rows(config, specs, np.asarray(pool.mean_log_priors),
                                            lm.config.vocab_size, word_id, optimizer))
  data = pool.descent_data(lm.params, specs)
  hp = rows.stacked_hyperparameters(specs)
  if pool.mesh is not None:
    state, hp = jax.device_put((state, hp), sharding.replicated(pool.mesh))
  step_fn = rows.make_rows_step(objective, optimizer, config.optim.lr, pool.mesh, data,
                                candidates=settle_rule(config)[0])

  def select(state_rows, idx):  # rows ``idx`` alone, for the loop to step once others stopped
    take = lambda tree: jax.tree.map(lambda x: x[jnp.asarray(idx)], tree)
    sub, sub_hp = take(state_rows), take(hp)
    if pool.mesh is not None:
      sub, sub_hp = jax.device_put((sub, sub_hp), sharding.replicated(pool.mesh))
    return sub, pool.descent_data(lm.params, [specs[i] for i in idx]), sub_hp
  searcher = None
  if config.search.every > 0 and config.label.num_tokens == 1:
    block = config.data.batch_size // pool.layout.data
    offsets = np.repeat(np.arange(pool.layout.data), block) * pool.layout.n_local
    searcher = search.make_search(objective, config.search.every, config.search.candidates,
                                  offsets)
  return Descent(specs=specs, step=step_fn, state=state, data=data, hp=hp, search=searcher,
                 select=select)


def label_features(config: ConfigDict, lm: LoadedModel, features: list[Feature], *,
                   checkpoints: str, stop: StopFlag, mesh: jax.sharding.Mesh | None = None,
                   trajectory_path: str | None = None, write: bool = True,
                   progress: bool = False, name: str = '', n_local: int = 0,
                   pool: Pool | None = None) -> Labeled:
  """Every row of every feature descended from ``checkpoints`` (resumed when it holds one) and
  scored. ``write`` is False on processes other than 0 of a multi-host job. The judge's notes
  on the texts (``prompt.note``) are kept beside the checkpoints, so a resumed run does not
  read them again."""
  if pool is None:
    note = config.prompt.get('note', '')
    kept_at = checkpoint.notes_path(checkpoints)
    kept = checkpoint.load_notes(kept_at, note)
    pool = build_pool(config, lm, features, mesh, n_local, known_notes=kept)
    if write and set(pool.notes) - set(kept):  # texts read now
      checkpoint.save_notes(kept_at, note, {**kept, **pool.notes})
  d = prepare_descent(config, lm, pool)
  specs, state, data, hp = d.specs, d.state, d.data, d.hp
  ckpt = Checkpointer(checkpoints, config.checkpoint_every)
  trajectory = None
  try:
    restored = ckpt.restore(state, optional=loop.ADDED_STATE)
    resumed_at = None
    if restored is not None:
      state, resumed_at = restored, int(restored['t'])
      log.info('%sResumed from the checkpoint at step %d.', f'{name}: ' if name else '',
               resumed_at)
    if trajectory_path is not None:
      trajectory = Trajectory(trajectory_path, int(state['t']), write=write)
    tok = lm.tokenizer
    decoded = {}
    decode = lambda ids: decoded.setdefault(ids, tok.decode(list(ids)))
    result = loop.descend(
        d.step, state, data, hp, steps=config.steps, early_stop_prob=config.early_stop.prob,
        patience=config.early_stop.patience, settle_patience=settle_rule(config)[1],
        ckpt=ckpt, stop=stop, trajectory=trajectory,
        decode=decode, search=d.search, progress=progress, name=name, select=d.select)
  finally:
    if trajectory is not None:
      trajectory.close()
    ckpt.close()
  start = time.perf_counter()
  label = jax.device_get(result.state['rows']['label'])
  p = np.asarray(jax.vmap(label_lib.probabilities, in_axes=(0, None, None))(
      label, pool.allowed, config.label.temperature))  # [N, K, V]
  scorer = scoring.LabelScorer(lm.model, lm.params, pool.caches, pool.tail_ids,
                               pool.answer_ids, config.loss.answer == 'full',
                               config.eval.batch_size, known=pool.known_margins)
  records = record.score_rows(config, lm.tokenizer, scorer, pool, specs, result, p,
                              trajectory.records if trajectory is not None else None)
  return Labeled(records=records, specs=specs, pool=pool, loop=result,
                 trajectory=trajectory.records if trajectory is not None else [],
                 resumed_at=resumed_at,
                 seconds={'pool': pool.seconds, 'notes': pool.notes_seconds,
                          'descent': result.descent_seconds, 'compile': result.compile_seconds,
                          'scoring': time.perf_counter() - start})
