"""Restarts and hyperparameter sweeps of one feature, descended together in one jitted step.

A label found once may be a local optimum of a non-convex loss, and the best loss weights and
learning rate differ between features. Rather than rerunning, ``run`` descends R label rows at
once: every point of ``config.sweep.grid`` (learning rates and loss weights), each from
``config.sweep.restarts`` initial labels. The step is ``descent.make_step``'s, vmapped over the
rows, with each row's hyperparameters passed in as arrays; the frozen model and the prefix caches
are shared (broadcast, never copied), so R rows cost one pass over the weights with R times the
batch. Every row sees the same batches, so rows differ only by what the grid and the restart
change. The result reports each row's label and held-out AUROC and which rows agree.

Config (``config.sweep``): ``restarts`` (label rows per grid point; restart 0 starts from the
configured ``label.init``, the others add Gaussian logits of std ``noise``, seeded by
``seed + restart``) and ``grid`` (``"optim.lr=0.05,0.1;loss.w_kl=0,0.02"``: the product of the
listed values over the keys of ``GRID_KEYS``).

A sweep runs on one device (``config.mesh`` is not used): its rows already fill a small model's
step, and a model that needs a mesh is better swept one run at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from tokenspace_jax import labeling
from tokenspace_jax.classifier.objective import Objective
from tokenspace_jax.engine import descent, scoring
from tokenspace_jax.models import LoadedModel, load_model
from tokenspace_jax.outputs import report
from tokenspace_jax.outputs.checkpoint import Checkpointer, StopFlag

log = logging.getLogger('tokenspace_jax')

# Grid key -> the row hyperparameter it sets.
GRID_KEYS = {'optim.lr': 'lr', 'loss.w_label': 'w_label', 'loss.w_entropy': 'w_entropy',
             'loss.w_kl': 'w_kl'}


def is_sweep(config: ConfigDict) -> bool:
  return bool(config.sweep.grid) or config.sweep.restarts > 1


def parse_grid(grid: str) -> dict[str, list[float]]:
  """``"optim.lr=0.05,0.1;loss.w_kl=0,0.02"`` -> {key: values}, checked."""
  out = {}
  for part in filter(None, (p.strip() for p in grid.split(';'))):
    key, sep, values = part.partition('=')
    key = key.strip()
    if not sep or key not in GRID_KEYS:
      raise labeling.ConfigValueError(
          f'sweep.grid entry {part!r}: expected KEY=V1,V2,... with KEY one of '
          f'{", ".join(GRID_KEYS)} (entries separated by ";").')
    try:
      out[key] = [float(v) for v in values.split(',')]
    except ValueError:
      raise labeling.ConfigValueError(f'sweep.grid entry {part!r}: values must be numbers.'
                                      ) from None
    if key == 'optim.lr' and min(out[key]) <= 0:
      raise labeling.ConfigValueError(f'sweep.grid: optim.lr values must be positive ({part}).')
  return out


def rows(config: ConfigDict) -> list[dict]:
  """One dict per label row: its restart index and hyperparameters (defaults from config)."""
  if config.sweep.restarts < 1:
    raise labeling.ConfigValueError(f'sweep.restarts={config.sweep.restarts} must be >= 1.')
  grid = parse_grid(config.sweep.grid)
  base = {'lr': config.optim.lr, 'w_label': config.loss.w_label,
          'w_entropy': config.loss.w_entropy, 'w_kl': config.loss.w_kl}
  out = []
  for values in itertools.product(*grid.values()):
    point = {**base, **{GRID_KEYS[k]: v for k, v in zip(grid, values, strict=True)}}
    out += [{'restart': r, **point} for r in range(config.sweep.restarts)]
  return out


def make_sweep_step(objective: Objective, optimizer: optax.GradientTransformation, base_lr: float):
  """``step(state, data, hp, active) -> (state, metrics)`` over label rows, jitted, donated.

  ``hp`` holds [R] arrays ``lr``, ``w_label``, ``w_entropy``, ``w_kl``. A row's learning rate
  scales its update (exact for Adam and AdamW, whose update is proportional to the rate; a
  schedule keeps its shape). Rows that are not ``active``, or whose step is not finite, are left
  as they were.
  """

  def row(state, data, hp):
    weights = dataclasses.replace(objective.weights, label=hp['w_label'],
                                  entropy=hp['w_entropy'], kl=hp['w_kl'])
    scaled = optax.chain(optimizer, optax.scale(hp['lr'] / base_lr))
    step = descent.make_step(dataclasses.replace(objective, weights=weights), scaled)
    return step.__wrapped__(state, data)

  def step(state, data, hp, active):
    new, metrics = jax.vmap(row, in_axes=(0, None, 0))(state, data, hp)
    keep = active & metrics['ok']
    select = lambda a, b: jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(select, new, state), metrics

  return jax.jit(step, donate_argnums=(0,))


def init_rows(config: ConfigDict, lm: LoadedModel, prep: labeling.Prepared,
              optimizer: optax.GradientTransformation, specs: list[dict]) -> dict:
  base = labeling.initial_label(config, lm, prep)
  labels = []
  for spec in specs:
    label = dict(base)
    if spec['restart'] > 0:
      key = jax.random.PRNGKey(config.seed + spec['restart'])
      label['logits'] = base['logits'] + config.sweep.noise * jax.random.normal(
          key, base['logits'].shape)
    labels.append(label)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *labels)
  chained = optax.chain(optimizer, optax.scale(1.0))
  return jax.vmap(lambda label: descent.init_state(label, chained))(stacked)


def run(config: ConfigDict, workdir: str, lm: LoadedModel | None = None,
        progress: bool | None = None) -> dict:
  """Descends every row of the sweep; writes and returns ``sweep.json``'s content."""
  labeling.validate_config(config)
  specs = rows(config)
  os.makedirs(workdir, exist_ok=True)
  result_path = os.path.join(workdir, 'sweep.json')
  labeling._check_workdir_config(workdir, config)
  if os.path.exists(result_path):
    with open(result_path) as f:
      log.info('%s already holds a finished sweep; not recomputing.', result_path)
      return json.load(f)
  wall_start = time.perf_counter()
  if lm is None:
    dtype = jnp.dtype(config.model.dtype)
    lm = load_model(config.model.source, dtype=dtype,
                    param_dtype=jnp.dtype(config.model.param_dtype or config.model.dtype))
  prep = labeling.prepare(config, lm)
  objective = labeling.make_objective(config, lm)
  optimizer = descent.make_optimizer(config.optim)
  hp = {k: jnp.asarray([s[k] for s in specs], jnp.float32)
        for k in ('lr', 'w_label', 'w_entropy', 'w_kl')}
  n = len(specs)
  state = {'rows': init_rows(config, lm, prep, optimizer, specs),
           'active': jnp.ones(n, bool), 'streak': jnp.zeros(n, jnp.int32)}
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), config.checkpoint_every)
  restored = ckpt.restore(state)
  if restored is not None:
    state = restored
    log.info('Resumed the sweep from its checkpoint at step %d.', int(state['rows']['step'].max()))
  log.info('Sweep of %d label rows on feature %s.', n, prep.feature.name)
  step_fn = make_sweep_step(objective, optimizer, config.optim.lr)
  trajectory = report.Trajectory(os.path.join(workdir, 'trajectory.jsonl'),
                                 int(state['rows']['step'].max()))
  try:
    state, compile_seconds = _descend(config, lm, prep, step_fn, state, hp, ckpt, trajectory,
                                      config.progress if progress is None else progress)
  finally:
    trajectory.close()
    ckpt.close()
  result = _finish(config, lm, prep, specs, state, trajectory.records)
  result.update(wall_seconds=time.perf_counter() - wall_start, compile_seconds=compile_seconds)
  report.write_json(result_path, result)
  return result


def _descend(config, lm, prep, step_fn, state, hp, ckpt, trajectory, progress):
  from tqdm import tqdm

  tok = lm.tokenizer
  start = int(state['rows']['step'].max())
  t0, compile_seconds = time.perf_counter(), None
  active, streak = np.asarray(state['active']), np.asarray(state['streak'])
  with StopFlag().installed() as stop, tqdm(total=config.steps, initial=start,
                                            disable=not progress, dynamic_ncols=True) as bar:
    for t in range(start, config.steps):
      if not active.any():
        break
      rows_state, metrics = step_fn(state['rows'], prep.data, hp, jnp.asarray(active))
      m = jax.device_get(metrics)
      if compile_seconds is None:
        compile_seconds = time.perf_counter() - t0
      bad = active & ~m['ok']
      if bad.any():
        log.warning('Rows %s: the loss became non-finite at step %d; they stop there.',
                    np.flatnonzero(bad).tolist(), t + 1)
      confidence = m['label_p'].min(axis=1)
      streak = np.where(active & (confidence >= config.early_stop.prob), streak + 1, 0)
      finished = active & ((config.early_stop.prob > 0) & (streak >= config.early_stop.patience)
                           | bad)
      active = active & ~finished
      state = {'rows': rows_state, 'active': jnp.asarray(active), 'streak': jnp.asarray(streak)}
      trajectory.append({
          'step': t + 1, 'loss': [float(x) for x in m['loss']],
          'label': [tok.decode([int(i) for i in ids]) for ids in m['label_ids']],
          'label_p': [float(x) for x in confidence], 'active': active.tolist(),
          'elapsed': time.perf_counter() - t0})
      bar.update(1)
      ckpt.save(t + 1, state)
      if stop:
        ckpt.save(t + 1, state, force=True)
        raise labeling.RunInterrupted(
            f'{stop.signal_name} received: stopped after step {t + 1} with a checkpoint. Rerun '
            'the same command to resume.')
  ckpt.save(max(start, int(state['rows']['step'].max())), state, force=True)
  return state, compile_seconds


def _finish(config, lm, prep, specs, state, records) -> dict:
  tok = lm.tokenizer
  logits = np.asarray(state['rows']['label']['logits'])  # [R, K, V]
  allowed = np.asarray(prep.data.allowed)
  p = np.asarray(jax.nn.softmax(np.where(allowed, logits / config.label.temperature, -1e9), -1))
  scorer = scoring.LabelScorer(lm.model, lm.params, prep.data.caches, prep.data.tail_ids,
                                prep.data.answer_ids, config.loss.answer == 'full',
                                config.eval.batch_size)
  targets, slot = prep.targets, prep.layout.slot_of()
  calib = labeling._stratified_pick(targets[:prep.n_train], config.eval.calibration_examples,
                                    config.seed + 2)
  held = np.arange(prep.n_train, len(prep.examples))
  score = lambda ids, text, role: scorer.score(ids, text, role, slot[calib], targets[calib],
                                               slot[held], targets[held])
  multi = p.shape[1] > 1
  scored = {}
  out_rows = []
  for r, spec in enumerate(specs):
    ids = [int(i) for i in p[r].argmax(-1)]
    text = tok.decode(ids)
    key = tuple(ids)
    if key not in scored:
      scored[key] = score(ids if multi else ids[0], text, 'found')
    p90 = next((rec['step'] for rec in records if rec['label_p'][r] >= 0.9), None)
    out_rows.append({**spec, 'row': r, 'label': text, 'token_ids': ids,
                     'probability': float(p[r].max(-1).min()), 'steps_to_p90': p90,
                     'steps': int(state['rows']['step'][r]),
                     'final_loss': records[-1]['loss'][r] if records else None,
                     'heldout_auroc': scored[key].auroc})
  baselines = [score(*label) for label in labeling.baseline_labels(config, tok, prep, p.shape[1])]
  agreement = {}
  for row in out_rows:
    agreement.setdefault(row['label'], []).append(row['row'])
  best = max(out_rows, key=lambda row: row['heldout_auroc'])
  return {'feature': prep.feature.name, 'rows': out_rows,
          'agreement': dict(sorted(agreement.items(), key=lambda kv: -len(kv[1]))),
          'best_row': best['row'], 'best_label': best['label'],
          'baselines': [s.as_dict() for s in baselines],
          'verdict': scoring.verdict([scored[tuple(best['token_ids'])]] + baselines),
          'config': json.loads(config.to_json())}


def summary(result: dict) -> str:
  lines = [f'Sweep of feature {result["feature"]!r}: {len(result["rows"])} label rows',
           '  row restart      lr  w_ent   w_kl  label                     p  p>=0.9 at  AUROC']
  for r in result['rows']:
    lines.append(f'  {r["row"]:3d} {r["restart"]:7d} {r["lr"]:7.3g} {r["w_entropy"]:6.3g} '
                 f'{r["w_kl"]:6.3g}  {r["label"]!r:<22} {r["probability"]:5.2f}  '
                 f'{r["steps_to_p90"] or "-":>9}  {r["heldout_auroc"]:.3f}')
  for s in result['baselines']:
    lines.append(f'  {s["role"]:<10} {s["token"]!r:<22} AUROC {s["auroc"]:.3f}')
  agree = ', '.join(f'{label!r}: rows {rows}' for label, rows in result['agreement'].items())
  lines.append(f'  agreement: {agree}')
  lines.append('  best row: ' + result['verdict']['message'])
  return '\n'.join(lines)
