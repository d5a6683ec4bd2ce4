"""Mixed precision: float32 state, computation in ``config.compute_dtype``.

The policy every detector follows (``dmad_jax.models.base.Detector.apply``), the one TPUs and
recent GPUs are built for:

* parameters, optimizer state and BatchNorm statistics are stored and updated in float32;
* a module is applied to its parameters and its floating inputs cast to the compute dtype, so
  Flax's layers (``dtype=None``: the result type of input and parameters) run convolutions,
  matmuls and activations in it; BatchNorm normalises with float32 statistics and returns the
  compute dtype;
* every floating output is cast back to float32 before it reaches a loss, a score or a
  sampling coordinate, so losses, scores and the chained deformation fields are float32.

What is compared pixel by pixel with an image stays float32 as well: a bfloat16 value near
+-1 moves in steps of 2^-8, as large as a good reconstruction's error, so the layers that output
images (the generator heads' last convolution and activation, :func:`at_least_float32` on their
input) and parameters that are images (PDM's background templates: a detector's
``float32_params``) are kept in float32.

The gradient of a cast is the cast of the gradient, so the optimizer sees float32 gradients of
the float32 parameters. Operations where bfloat16 would lose what matters accumulate in float32
whatever the input dtype (each says so in its docstring): vector quantisation's distances
(``ops.quantize``), the block memory's cosines and reads (``ops.memory``), ``grid_sample``'s
weighted sums and gradients (``ops.sampling``) and the separable filters (``ops.filters``).

With ``compute_dtype = "float32"`` (the default) every cast is the identity and the programs
are those of a model without this policy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DTYPES", "at_least_float32", "cast_floating", "compute_dtype", "for_compute"]

# The compute dtypes a config may name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config) -> jnp.dtype:
  """The dtype named by ``config.compute_dtype`` (float32 when the config has none).

  Raises:
    ValueError: for a name that is not one of :data:`DTYPES`.
  """
  name = config.get("compute_dtype", "float32") if hasattr(config, "get") else "float32"
  if name not in DTYPES:
    raise ValueError(f"config.compute_dtype must be one of {', '.join(DTYPES)}, got {name!r}")
  return jnp.dtype(DTYPES[name])


def _is_floating(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree: Any, dtype) -> Any:
  """``tree`` with every floating array leaf cast to ``dtype``; other leaves unchanged."""
  dtype = jnp.dtype(dtype)

  def cast(x):
    return x.astype(dtype) if _is_floating(x) and x.dtype != dtype else x

  return jax.tree.map(cast, tree)


def for_compute(variables: dict, dtype, keep: tuple[str, ...] = ()) -> dict:
  """Flax ``variables`` with the ``params`` collection cast to ``dtype``, except its top-level
  entries named in ``keep``; the other collections (BatchNorm statistics, fitted values) stay
  as stored."""

  def params(tree):
    return {k: v if k in keep else cast_floating(v, dtype) for k, v in tree.items()}

  return {k: params(v) if k == "params" else v for k, v in variables.items()}


def at_least_float32(x: jax.Array) -> jax.Array:
  """``x`` in float32 when it is in a narrower floating dtype: feed a layer with it to compute
  that layer in float32 (its bfloat16 kernel is promoted), e.g. the convolution that outputs
  an image."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))
