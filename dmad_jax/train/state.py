"""Building and restoring a detector's state: the one module both jobs use.

* Training: :func:`create` makes the state of step 0 (parameters, BatchNorm statistics, the
  optimizer of every parameter group, the run's PRNG key); :func:`abstract` is its shape, from
  which the shardings are derived, so the state is created (or restored) directly in them.
* Inference (the eval job, calibration, ``dmad predict``): :func:`restore_variables` restores
  only ``{"params", "batch_stats"}`` of a checkpoint step, never the optimizer state.

Shapes come from the data source's ``element_spec``: nothing is read to build a state.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from dmad_jax.nn import precision
from dmad_jax.train import checkpoint, optim, sharding


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics and the run's base PRNG key (raw uint32 key data,
  so checkpoints stay plain arrays). The per-step key is ``fold_in(rng, step)``."""

  batch_stats: Any = None
  rng: jax.Array = flax.struct.field(default=None)


def cast_floating(tree, dtype):
  """``tree`` with every floating-point leaf cast to ``dtype`` (None: unchanged); integer and
  key leaves stay as they are."""
  if dtype is None:
    return tree
  name = dtype
  try:
    dtype = jnp.dtype(name)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"param_dtype must be a floating dtype ('float32', 'float64'), got {name!r}")
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError(
      "param_dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 in the environment (or "
      "jax.config.update('jax_enable_x64', True) before any array is created)"
    )
  return precision.cast_floating(tree, dtype)


def variables_of(state) -> dict:
  """The model variables ({"params", "batch_stats"}) of a state (or of its shardings)."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def base_rng(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, training key) as raw uint32 key data, both derived from the config seed."""
  key = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(key)
  return init_key, jnp.asarray(train_key)


def example_batch(element_spec: Mapping[str, Any], batch_size: int = 1) -> dict:
  """A batch of zeros with the records' shapes and dtypes: enough to initialise a model, whose
  variables depend on shapes only."""
  return {
    k: np.zeros((batch_size, *s.shape), s.dtype) for k, s in element_spec.items() if k[0] != "_"
  }


def make_optimizer(
  config, detector, total_steps: int, params_shape
) -> optax.GradientTransformation:
  """``config.optimizer`` for every parameter, or, when the detector declares
  ``optimizer_groups``, one optimizer (own optax state) per top-level parameter group, each from
  its config section."""
  groups = detector.optimizer_groups()
  if groups is None:
    return optim.make_optimizer(config.optimizer, total_steps, params_shape, where="optimizer")
  missing = sorted(set(params_shape) - set(groups))
  if missing:
    raise ValueError(
      f"{detector.name}: parameter groups {missing} have no optimizer in optimizer_groups()"
    )
  return optax.multi_transform(
    {
      k: optim.make_optimizer(config[sec], total_steps, params_shape[k], where=sec)
      for k, sec in groups.items()
    },
    {k: k for k in params_shape},
  )


def optimizer(
  config, detector, element_spec, total_steps: int, params_shape=None
) -> optax.GradientTransformation:
  """The run's optimizer (:func:`make_optimizer` for the detector's parameter shapes). Build it
  once and pass it to :func:`create` and :func:`abstract`: the state carries it as static
  metadata, which must be the same object in both. ``params_shape``: the parameters of
  :func:`abstract_variables`, when the caller has them (``init`` is not traced again)."""
  if params_shape is None:
    init_rng, _ = base_rng(config.seed)
    params_shape = jax.eval_shape(detector.init, init_rng, example_batch(element_spec))["params"]
  return make_optimizer(config, detector, total_steps, params_shape)


def create(config, detector, element_spec, tx, init_value=None) -> TrainState:
  """The state of step 0 with optimizer ``tx`` (from :func:`optimizer`). Pure (``init_value``,
  the detector's ``data_init`` value, is a constant), so ``jax.jit(..., out_shardings=...)``
  creates it sharded.

  ``config.param_dtype`` (e.g. "float64") casts the floating parameters and BatchNorm statistics
  before the optimizer state is made from them; Flax layers with ``dtype=None`` then compute in
  that precision too (numerics checks; the default keeps the layers' own float32).
  """
  init_rng, train_rng = base_rng(config.seed)
  variables = cast_floating(
    detector.init(init_rng, example_batch(element_spec)), config.get("param_dtype", None)
  )
  params = variables["params"]
  if init_value is not None:
    params = detector.apply_data_init(params, init_value)
  return TrainState.create(
    apply_fn=None,
    params=params,
    tx=tx,
    batch_stats=variables.get("batch_stats", {}),
    rng=train_rng,
  )


def initial(config, detector, element_spec, total_steps: int, init_value=None) -> TrainState:
  """:func:`create` with the run's :func:`optimizer` (for scripts and tests; the trainer builds
  the optimizer once and creates the state sharded)."""
  tx = optimizer(config, detector, element_spec, total_steps)
  return create(config, detector, element_spec, tx, init_value)


def abstract(config, detector, element_spec, tx=None, variables=None) -> TrainState:
  """The shapes and dtypes of :func:`create`'s state (nothing is computed); without ``tx``, an
  optimizer for a one-step run (its state's shapes do not depend on the run's length).
  ``variables``: :func:`abstract_variables` of the same arguments, when the caller has them
  (the state is then built around them without tracing ``init`` again)."""
  tx = tx if tx is not None else optimizer(config, detector, element_spec, 1)
  if variables is None:
    return jax.eval_shape(functools.partial(create, config, detector, element_spec, tx))

  def around(v):
    _, train_rng = base_rng(config.seed)
    return TrainState.create(
      apply_fn=None, params=v["params"], tx=tx, batch_stats=v["batch_stats"], rng=train_rng
    )

  return jax.eval_shape(around, variables)


def abstract_variables(config, detector, element_spec) -> dict:
  """The shapes and dtypes of the ``{"params", "batch_stats"}`` of :func:`create`'s state (one
  trace of ``init``; no optimizer is built): what inference restores."""

  def variables():
    init_rng, _ = base_rng(config.seed)
    v = detector.init(init_rng, example_batch(element_spec))
    v = cast_floating(v, config.get("param_dtype", None))
    return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}

  return jax.eval_shape(variables)


def shardings(abstract_state, mesh, config):
  """The state's shardings on ``mesh`` (replicated, or FSDP-split with an ``fsdp`` axis)."""
  return sharding.state_shardings(
    abstract_state, mesh, fsdp_min_size=config.get("fsdp_min_size", 2**18)
  )


def restore_variables(config, detector, element_spec, workdir: str, step: int, mesh, shapes=None):
  """The ``{"params", "batch_stats"}`` of checkpoint ``step`` of ``workdir``, sharded on
  ``mesh``; the optimizer state and the data position are not read.

  Args:
    shapes: :func:`abstract_variables` of the same arguments, when the caller has it (saves
      tracing ``init`` again, e.g. for every checkpoint the eval job evaluates).

  Returns:
    (variables, their shardings).

  Raises:
    CheckpointMismatchError: when the checkpoint does not fit the config's model.
  """
  if shapes is None:
    shapes = abstract_variables(config, detector, element_spec)
  var_sh = sharding.state_shardings(shapes, mesh, fsdp_min_size=config.get("fsdp_min_size", 2**18))
  target = sharding.with_shardings(shapes, var_sh)
  variables = checkpoint.restore_subset(workdir, step, target, config=config)
  return variables, var_sh


def state_at(config, workdir: str, step: int | None = None) -> TrainState:
  """The whole train state of checkpoint ``step`` (None: the latest) of a run of ``config``,
  optimizer state included, with shapes from ``config.data`` alone (for scripts and tests that
  compare runs)."""
  from dmad_jax import data as data_lib
  from dmad_jax.models import get_detector

  step = checkpoint.latest_step(workdir, step)
  target = abstract(config, get_detector(config), data_lib.element_spec(config.data))
  mngr = checkpoint.manager(workdir, read_only=True)
  return checkpoint.restore(mngr, step, target, config=config)


def variables_at(config, workdir: str, step: int | None = None) -> dict:
  """The ``{"params", "batch_stats"}`` of checkpoint ``step`` (None: the latest) of a run of
  ``config``, on the config's mesh, with shapes from ``config.data`` alone (for scripts and
  tests that read a run's result)."""
  from dmad_jax import data as data_lib
  from dmad_jax.models import get_detector

  step = checkpoint.latest_step(workdir, step)
  mesh = sharding.make_mesh(config.get("mesh", None))
  spec = data_lib.element_spec(config.data)
  return restore_variables(config, get_detector(config), spec, workdir, step, mesh)[0]


def _tuples(value):
  """JSON lists back to the tuples the configs use (recursively)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_run_config(workdir: str):
  """The run's config from ``<workdir>/config.json`` (lists read back as tuples).

  Raises:
    FileNotFoundError: when the file is missing (not a ``dmad train`` workdir).
  """
  import ml_collections

  path = os.path.join(os.path.abspath(workdir), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} does not exist: {workdir!r} is not a dmad train workdir (train first, or give "
      "the workdir of a run)"
    )
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def _subtree(tree, path: str, what: str):
  node = tree
  for key in path.split("/")[1:]:
    if not isinstance(node, dict) or key not in node:
      known = sorted(node) if isinstance(node, dict) else []
      raise ValueError(f"{what}: no {path!r} (at {key!r}; there: {known})")
    node = node[key]
  return node


def _replaced(tree, path: str, value):
  keys = path.split("/")[1:]
  if not keys:
    return value
  head, rest = keys[0], "/".join(["", *keys[1:]])
  return {**tree, head: _replaced(tree[head], rest, value)}


def with_values_from_run(state: TrainState, init_from) -> TrainState:
  """``state`` with parts replaced by those of another run's checkpoint (``config.init_from``:
  ``workdir``, ``step`` (None: its latest) and ``assign``, pairs ``(from, to)`` of paths such
  as ``"params/encoder"`` -> ``"batch_stats/local_encoder/params"``). Used for a pre-trained
  part, e.g. IGD's knowledge-distilled local encoder. Each replaced part keeps the dtypes and
  shardings of the values it replaces.

  Raises:
    ValueError: naming the path, when a path is missing or the structures or shapes differ.
  """
  workdir = init_from["workdir"]
  source = variables_at(load_run_config(workdir), workdir, init_from.get("step", None))
  parts = {"params": state.params, "batch_stats": state.batch_stats}
  for src, dst in init_from["assign"]:
    for path in (src, dst):
      if path.split("/")[0] not in parts:
        raise ValueError(
          f"config.init_from.assign: {path!r} must start with params/ or batch_stats/"
        )
    new = _subtree(source[src.split("/")[0]], src, f"the run in {workdir}")
    old = _subtree(parts[dst.split("/")[0]], dst, "this run")
    shapes = (jax.tree.map(np.shape, new), jax.tree.map(np.shape, old))
    if shapes[0] != shapes[1]:
      raise ValueError(
        f"config.init_from: {src} of the run in {workdir} has shapes {shapes[0]}, but {dst} "
        f"of this run has {shapes[1]}"
      )
    value = jax.tree.map(lambda n, o: jax.device_put(np.asarray(n, o.dtype), o.sharding), new, old)
    root = dst.split("/")[0]
    parts[root] = _replaced(parts[root], dst, value)
  return state.replace(params=parts["params"], batch_stats=parts["batch_stats"])
