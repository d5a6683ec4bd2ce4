"""``FastConv``: Flax's ``nn.Conv`` with dmad_jax's CPU weight gradient (``ops.conv``).

Same parameters, names and forward pass as ``nn.Conv``; on CPU its weight gradient is a C++
kernel (several times faster than XLA:CPU's; see ``dmad_jax/ops/conv.py``), everywhere else it
is exactly ``nn.Conv``. Every convolution in ``dmad_jax.nn`` and ``dmad_jax.models`` uses it.

``FastConvTranspose``: Flax's ``nn.ConvTranspose(transpose_kernel=True)`` computed without
convolving over inserted zeros (``ops.conv.conv_transpose``), on every platform.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.ops import conv

FastConv = functools.partial(nn.Conv, conv_general_dilated=conv.conv_general_dilated)


class FastConvTranspose(nn.Module):
  """Flax's ``nn.ConvTranspose(transpose_kernel=True)`` (torch's ``ConvTranspose2d``) for NHWC
  images with explicit padding, computed by ``ops.conv.conv_transpose``: one stride-1
  convolution per output phase instead of a convolution over a zero-interleaved input. Same
  parameter (``kernel``, shape ``kernel_size + (features, in_features)``) and initialiser as
  ``nn.ConvTranspose``; name it ``ConvTranspose_0`` where a checkpoint expects that path.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: ((lo_h, hi_h), (lo_w, hi_w)) as in ``lax.conv_transpose``.
    use_bias: add a bias.
    kernel_init: kernel initialiser.
    bias_init: bias initialiser.
    dtype: computation dtype (None: that of the input and parameters, as in Flax).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H', W', features)."""
    shape = tuple(self.kernel_size) + (self.features, x.shape[-1])
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = conv.conv_transpose(x.astype(dtype), kernel.astype(dtype), self.strides, self.padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(dtype)
    return y
