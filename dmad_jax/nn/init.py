"""PyTorch's default parameter initialisers, so that freshly initialised dmad_jax models start
from the same distribution as the official PyTorch code."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# torch.nn.Conv2d.reset_parameters uses kaiming_uniform_(a=sqrt(5)): bound gain * sqrt(3 / fan_in)
# with gain^2 = 2 / (1 + 5) = 1/3, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)). That is exactly
# variance_scaling(1/3, "fan_in", "uniform"), whose bound is sqrt(3 * scale / fan_in). Flax's
# fan_in axis (-2 of an HWIO kernel) is torch's dim 1, also for transposed convolutions, where
# torch's "fan_in" is therefore the number of OUTPUT channels times kh * kw.
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform"
)


def torch_default_bias_init(fan_in: int) -> Initializer:
  """Returns torch's default Conv2d bias initialiser, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Flax bias initialisers only see the bias shape, so the fan-in (kh * kw * in_channels) has to be
  bound in advance.

  Args:
    fan_in: kh * kw * in_channels of the convolution.

  Returns:
    An initializer `(key, shape, dtype) -> array`.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init
