"""CoordConv: a convolution over the input plus DMAD's 4 block-wise coordinate channels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.nn.fast_conv import FastConv
from dmad_jax.nn.init import Initializer, torch_default_bias_init, torch_default_kernel_init
from dmad_jax.ops import filters

__all__ = ["CoordConv"]


class CoordConv(nn.Module):
  """Convolution over [x, xx, xx_, yy, yy_]: the official `CoordConv2d` in NHWC.

  `filters.add_coords` appends the 4 block-wise coordinate channels, then one `nn.Conv` (named
  "conv", like the official `self.conv`) maps the C + 4 channels to `features`. It is the only
  parameterised layer: the official class subclasses Conv2d and so also registers an unused
  C -> features weight, which is deliberately not reproduced (it never touches the output).

  The defaults reproduce torch's Conv2d initialisation: the kernel uses kaiming_uniform with
  a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = kh * kw * (C + 4), which is
  `nn.initializers.variance_scaling(1/3, "fan_in", "uniform")`; with `use_bias=True` and no
  `bias_init` the bias is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as well.

  Attributes:
    features: number of output channels.
    kernel_size: (kh, kw) of the convolution.
    strides: convolution strides (int or pair).
    padding: flax padding: an int p (torch `padding=p`), pairs, or 'SAME' / 'VALID'.
    use_bias: whether the conv has a bias (DMAD: False).
    num_blocks: fs of `filters.coord_channels` (PDM: 32; PPDM: S / 4); must divide the input
      size S.
    kernel_init: kernel initializer; defaults to torch's Conv2d default.
    bias_init: bias initializer; None means torch's Conv2d default for this fan-in.
    dtype: computation dtype (None: inferred from inputs and params, as in `nn.Conv`).
    param_dtype: parameter dtype.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: str | int | Sequence[int | tuple[int, int]] = 1
  use_bias: bool = False
  num_blocks: int = 32
  kernel_init: Initializer = torch_default_kernel_init
  bias_init: Initializer | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the coordinate-augmented convolution.

    Args:
      x: (N, S, S, C) square input.

    Returns:
      (N, S', S', features) output; S' = S with the defaults (3 x 3, stride 1, padding 1).

    Raises:
      ValueError: if `x` is not square or `num_blocks` does not divide S.
    """
    x = filters.add_coords(x, num_blocks=self.num_blocks)
    bias_init = self.bias_init
    if bias_init is None:
      bias_init = torch_default_bias_init(math.prod(self.kernel_size) * x.shape[-1])
    return FastConv(
      features=self.features,
      kernel_size=tuple(self.kernel_size),
      strides=self.strides,
      padding=self.padding,
      use_bias=self.use_bias,
      kernel_init=self.kernel_init,
      bias_init=bias_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )(x)
