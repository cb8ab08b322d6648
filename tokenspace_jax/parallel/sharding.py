"""Device meshes, and where every array of a descent run lives on them.

The model code holds no mesh logic: placement is a table of regular expressions over the
'/'-joined parameter paths, each giving a ``PartitionSpec`` over two mesh axes,

* ``data``: data parallelism. Each device along it owns a share of the examples (their prefix
  caches, priors and targets) and computes the loss on its share of every batch;
* ``model``: tensor parallelism for models whose weights do not fit on one device, in the
  Megatron layout: the embedding and head split on the vocabulary, Q/K/V/gate/up on their output
  axis (whole heads per device), O/down on their input axis, so each layer needs one all-reduce
  after attention and one after the MLP, which the compiler inserts.

With ``model=1`` every parameter is replicated: a small model pays no communication but the
gradient all-reduce. A dimension the ``model`` axis does not divide stays unsplit rather than
failing, so one table serves every Llama size.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tokenspace_jax.classifier.prefix import PrefixCaches
from tokenspace_jax.engine.descent import DescentData

log = logging.getLogger('tokenspace_jax')

DATA, MODEL = 'data', 'model'

# First match wins. Leading ``None`` of the layer rules is the stacked layer axis (nn.scan).
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r'embed', P(MODEL, None)),  # [V, D]
    (r'lm_head', P(None, MODEL)),  # [D, V]
    (r'layers/attn/(q|k|v)/kernel', P(None, None, MODEL)),  # [L, D, heads * head_dim]
    (r'layers/attn/(q|k|v)/bias', P(None, MODEL)),  # [L, heads * head_dim] (Qwen2)
    (r'layers/attn/o/kernel', P(None, MODEL, None)),  # [L, heads * head_dim, D]
    (r'layers/mlp/(gate|up)/kernel', P(None, None, MODEL)),  # [L, D, F]
    (r'layers/mlp/down/kernel', P(None, MODEL, None)),  # [L, F, D]
    (r'.*', P()),  # norms
)


class MeshError(ValueError):
  pass


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
  """(data, model) with one ``-1`` resolved to the remaining devices; checked to fit exactly."""
  if data == -1 and model == -1:
    raise MeshError('mesh.data and mesh.model cannot both be -1.')
  if data == -1 or model == -1:
    known = model if data == -1 else data
    if known <= 0 or num_devices % known:
      raise MeshError(f'{num_devices} devices cannot be split into {known}-device groups '
                      f'(mesh data={data}, model={model}).')
    rest = num_devices // known
    data, model = (rest, model) if data == -1 else (data, rest)
  if data <= 0 or model <= 0 or data * model != num_devices:
    raise MeshError(f'mesh data={data} x model={model} needs {data * model} devices; '
                    f'{num_devices} are available. Use -1 for "the remaining devices".')
  return data, model


def make_mesh(cfg=None, *, data: int = -1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, model) mesh of ``config.mesh`` (or the keyword sizes) over all devices.

  Both axes are ``Auto``: the data-parallel step makes ``data`` manual itself and leaves
  ``model`` to the compiler, which is what keeps the model code free of collectives.
  """
  if cfg is not None:
    data, model = cfg.data, cfg.model
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, model, len(devices))
  return jax.make_mesh(shape, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """``spec`` padded to the array's rank, with axes that do not divide their dimension dropped."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for size, axis in zip(shape, entries, strict=True):
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    parts = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    fitted.append(axis if size % parts == 0 else None)
  return P(*fitted)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, P]] = PARAM_RULES) -> P:
  """The first rule matching ``path``, fitted to the array (see ``fit_spec``)."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      if len(spec) > len(shape):
        raise MeshError(f'Rule {pattern!r} gives {spec} to {path} of rank {len(shape)}.')
      fitted = fit_spec(spec, shape, mesh)
      if fitted != P(*spec, *[None] * (len(shape) - len(spec))):
        log.info('%s %s: %s does not divide it; kept unsplit as %s.', path, tuple(shape), spec,
                 fitted)
      return fitted
  raise MeshError(f'No sharding rule matches the parameter {path}.')


def param_specs(params, mesh: Mesh, rules: Sequence[tuple[str, P]] = PARAM_RULES) -> dict:
  """A tree of ``PartitionSpec`` matching ``params`` (arrays or ``jax.eval_shape`` structs)."""
  flat = flatten_dict(params)
  return unflatten_dict({k: spec_for('/'.join(k), v.shape, mesh, rules) for k, v in flat.items()})


def param_shardings(params, mesh: Mesh, rules: Sequence[tuple[str, P]] = PARAM_RULES) -> dict:
  """``NamedSharding``s for ``params``; pass to ``load_model(shardings=...)`` to load in place."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def cache_specs(caches: PrefixCaches, mesh: Mesh) -> PrefixCaches:
  """Prefix caches split along ``data`` by example and along ``model`` by KV head (matching the
  K/V projections); the part every prompt shares is one copy per ``data`` shard. Contexts are
  split along ``data`` like the examples (``prompts.split_contexts`` gives each shard a block
  holding the contexts of its examples). The packed tokens of both are split along ``data`` too:
  ``classifier.prefix.pack_left_padded`` gives each block an equal share of them."""
  fit = lambda spec, x: None if x is None else fit_spec(spec, x.shape, mesh)
  c = caches
  return PrefixCaches(k=fit(P(None, DATA, MODEL, None), c.k),
                      v=fit(P(None, DATA, MODEL, None), c.v),
                      valid=fit(P(DATA, None), c.valid),
                      start=fit(P(DATA), c.start),
                      log_prior=fit(P(DATA, MODEL), c.log_prior),
                      shared_k=fit(P(None, None, MODEL, None), c.shared_k),
                      shared_v=fit(P(None, None, MODEL, None), c.shared_v),
                      baseline=fit(P(DATA), c.baseline),
                      context_k=fit(P(None, DATA, MODEL, None), c.context_k),
                      context_v=fit(P(None, DATA, MODEL, None), c.context_v),
                      context_valid=fit(P(DATA, None), c.context_valid),
                      context_start=fit(P(DATA), c.context_start),
                      context_of=fit(P(DATA), c.context_of))


def cache_shardings(caches: PrefixCaches, mesh: Mesh) -> PrefixCaches:
  """``NamedSharding``s of ``cache_specs``; for ``classifier.prefix_caches(out_shardings=...)``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(caches, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def data_specs(data: DescentData, mesh: Mesh, rules: Sequence[tuple[str, P]] = PARAM_RULES,
               ) -> DescentData:
  """PartitionSpecs for sharded ``DescentData`` (its schedule holds local slot indices).

  Everything indexed by example is split along ``data``: the prefix caches (which are also split
  along ``model`` on their KV-head axis, matching the K/V projections), the priors and the
  targets. The schedule ([steps, batch], or [rows, steps, batch]) is split on its batch axis, so
  each device reads the local slots of its own share of every batch. The rest is small and
  replicated.
  """
  c = data.caches
  caches = cache_specs(c, mesh)
  for name, x in (('examples', c.valid.shape[0]), ('batch', data.schedule.shape[-1])):
    if x % mesh.shape[DATA]:
      raise MeshError(f'The {name} axis ({x}) is not a multiple of mesh data='
                      f'{mesh.shape[DATA]}: pad it (see shard_layout).')
  # The schedule's last axis is the batch: [steps, batch], or [rows, steps, batch].
  schedule = P(*([None] * (data.schedule.ndim - 1)), DATA)
  return DescentData(
      params=param_specs(data.params, mesh, rules), caches=caches, targets=P(DATA),
      schedule=schedule, tail_ids=P(), answer_ids=P(), allowed=P(), mean_log_prior=P())


def data_shardings(data: DescentData, mesh: Mesh,
                   rules: Sequence[tuple[str, P]] = PARAM_RULES) -> DescentData:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), data_specs(data, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def place_data(data: DescentData, mesh: Mesh) -> DescentData:
  """``data`` with its examples split along ``data`` and its weights placed by the rule table.

  The weights and caches are moved device to device (a no-op where ``load_model`` and
  ``prefix_caches`` already placed them); the small rest goes through the host, each process
  uploading only the slices its own devices hold.
  """
  from tokenspace_jax.parallel import distributed

  shardings = data_shardings(data, mesh)
  on_device = lambda d: (d.params, d.caches)
  rest = distributed.put_global(jax.device_get(data.replace(params={}, caches=None)),
                                shardings.replace(params={}, caches=None))
  params, caches = jax.device_put(on_device(data), on_device(shardings))
  return rest.replace(params=params, caches=caches)


def data_axis_specs(specs):
  """``specs`` with every axis but ``data`` removed: the in_specs of a shard_map manual over
  ``data`` only (the ``model`` placement travels with the arrays and is the compiler's)."""
  def keep(spec: P) -> P:
    return P(*[DATA if a == DATA or (isinstance(a, tuple) and DATA in a) else None
               for a in spec])
  return jax.tree.map(keep, specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
