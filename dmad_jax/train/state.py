"""TrainState and its construction, shared by the trainer and the eval job."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


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

  def cast(a):
    return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

  return jax.tree.map(cast, tree)


def create_train_state(
  detector, tx: optax.GradientTransformation, init_rng, rng, batch, *, param_dtype=None
):
  """Initialises the detector on ``batch`` and wraps it with the optimizer.

  ``param_dtype`` (e.g. "float64") casts the floating parameters and BatchNorm statistics
  before the optimizer state is made from them; Flax layers with ``dtype=None`` then compute in
  that precision too (numerics checks; the default keeps the layers' own float32).
  """
  variables = cast_floating(detector.init(init_rng, batch), param_dtype)
  return TrainState.create(
    apply_fn=None,
    params=variables["params"],
    tx=tx,
    batch_stats=variables.get("batch_stats", {}),
    rng=rng,
  )


def variables_of(state: TrainState) -> dict:
  """The model variables ({"params", "batch_stats"}) of a state."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def base_rng(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, training key) as raw uint32 key data, both derived from the config seed."""
  key = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(key)
  return init_key, jnp.asarray(train_key)
