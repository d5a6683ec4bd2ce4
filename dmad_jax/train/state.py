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


def create_train_state(detector, tx: optax.GradientTransformation, init_rng, rng, batch):
  """Initialises the detector on ``batch`` and wraps it with the optimizer."""
  variables = detector.init(init_rng, batch)
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
