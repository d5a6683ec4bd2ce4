"""Convolution blocks shared by the reconstruction models (MNAD / DMAD-PDM family), NHWC.

Each block reproduces a PyTorch block of the official code, including which convolutions carry
a bias (this fixes the parameter count) and torch's default initialisation. BatchNorm uses
torch's defaults translated to Flax: momentum 0.1 in torch is 0.9 here, epsilon 1e-5.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.nn import precision
from dmad_jax.nn.coordconv import CoordConv
from dmad_jax.nn.fast_conv import FastConv, FastConvTranspose
from dmad_jax.nn.init import torch_default_bias_init, torch_default_kernel_init


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """torch.nn.BatchNorm2d defaults: batch statistics in training, running averages otherwise."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class Conv(nn.Module):
  """``torch.nn.Conv2d`` with torch's default init; padding k // 2 keeps the size at stride 1.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    strides: stride.
    use_bias: whether to add a bias (torch's default is True; DMAD turns it off before a BN).
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H / strides, W / strides, features)."""
    k = self.kernel_size
    return FastConv(
      self.features,
      (k, k),
      strides=self.strides,
      padding=k // 2,
      use_bias=self.use_bias,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(k * k * x.shape[-1]),
    )(x)


def _conv(features, coord_blocks, use_bias=False, name=None):
  """A 3x3 conv, with DMAD's coordinate channels when ``coord_blocks`` is set."""
  if coord_blocks:
    return CoordConv(features, num_blocks=coord_blocks, use_bias=use_bias, name=name)
  return Conv(features, 3, use_bias=use_bias, name=name)


class Basic(nn.Module):
  """MNAD/DMAD ``Basic``: [conv3 (no bias) - BN - ReLU] x 2.

  With ``last_linear=True`` it is ``Basic_``: conv3 - BN - ReLU - conv3 (with bias), no BN or
  ReLU at the end (the encoder's last block, whose output is quantised).

  Attributes:
    features: output channels of both convolutions.
    coord_blocks: if set, both convolutions are CoordConvs with this ``num_blocks``.
    last_linear: the ``Basic_`` variant.
    use_bias: whether the convolutions before a BN carry a bias (MNAD: yes, torch's default;
      DMAD turned it off).
  """

  features: int
  coord_blocks: int | None = None
  last_linear: bool = False
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(N, H, W, C) -> (N, H, W, features)."""
    x = _conv(self.features, self.coord_blocks, use_bias=self.use_bias)(x)
    x = nn.relu(batch_norm(train)(x))
    if self.last_linear:
      return _conv(self.features, self.coord_blocks, use_bias=True)(x)
    x = _conv(self.features, self.coord_blocks, use_bias=self.use_bias)(x)
    return nn.relu(batch_norm(train)(x))


class Upsample(nn.Module):
  """ConvTranspose(k3, s2, p1, output_padding 1, no bias) - BN - ReLU: exactly doubles H and W.

  Torch's transposed convolution is the gradient of a convolution: that is Flax's
  ``ConvTranspose`` with ``transpose_kernel=True`` and padding (k - 1 - p, k - 1 - p + op) =
  (1, 2) on each spatial axis.

  Attributes:
    features: output channels.
    use_bias: whether the transposed convolution carries a bias (MNAD: yes; DMAD: no).
  """

  features: int
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(N, H, W, C) -> (N, 2H, 2W, features)."""
    x = FastConvTranspose(
      self.features,
      (3, 3),
      strides=(2, 2),
      padding=((1, 2), (1, 2)),
      use_bias=self.use_bias,
      kernel_init=torch_default_kernel_init,
      # torch's fan-in of a transposed convolution is out_channels * kh * kw (see nn.init).
      bias_init=torch_default_bias_init(9 * self.features),
      name="ConvTranspose_0",  # the parameter path of nn.ConvTranspose (checkpoints, convert)
    )(x)
    return nn.relu(batch_norm(train)(x))


class Head(nn.Module):
  """MNAD ``Gen`` / DMAD ``Mask``: conv3-BN-ReLU-conv3-BN-ReLU-conv3(bias)-activation.

  Attributes:
    features: width of the two hidden convolutions.
    out_channels: channels of the output.
    activation: "tanh" (image generator, output in [-1, 1]) or "sigmoid" (mask in [0, 1]).
    hidden_bias: whether the hidden convolutions carry a bias (DMAD: no; the parameter
      count of the official Ped2 model pins this).
  """

  features: int
  out_channels: int
  activation: str = "tanh"
  hidden_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(N, H, W, C) -> (N, H, W, out_channels)."""
    for _ in range(2):
      x = Conv(self.features, 3, use_bias=self.hidden_bias)(x)
      x = nn.relu(batch_norm(train)(x))
    # The output is an image (or a mask multiplying one): its convolution and activation run
    # in float32 whatever the compute dtype (dmad_jax.nn.precision).
    x = Conv(self.out_channels, 3, use_bias=True)(precision.at_least_float32(x))
    return jnp.tanh(x) if self.activation == "tanh" else nn.sigmoid(x)


class ResBlock(nn.Module):
  """x + [ReLU, conv3 (bias), BN, ReLU, conv1x1 (bias)](x), as in DMAD's OffsetNet trunk."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(N, H, W, C) -> (N, H, W, C)."""
    c = x.shape[-1]
    h = Conv(c, 3)(nn.relu(x))
    h = nn.relu(batch_norm(train)(h))
    return x + Conv(c, 1)(h)


def max_pool2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2, exactly torch.nn.MaxPool2d(2) in value and gradient (an odd
  last row or column is dropped; on ties the first entry of the window in row-major order gets
  the gradient).

  A max over a (H/2, 2, W/2, 2) reshape with an elementwise backward pass rather than
  ``nn.max_pool``, whose select-and-scatter gradient XLA:CPU runs as a reduce-window that also
  tracks argmax indices (measured: ~0.2 s of thread time per batch-4 Ped2 train step).
  """
  _, h, w, _ = x.shape
  return _max_pool2_even(x[:, : h - h % 2, : w - w % 2])


def _windows(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def _max_pool2_even(x):
  return jnp.max(_windows(x), axis=(2, 4))


def _max_pool2_fwd(x):
  y = _max_pool2_even(x)
  return y, (x, y)


def _max_pool2_bwd(residuals, g):
  x, y = residuals
  xs = _windows(x)
  taken = jnp.zeros(y.shape, bool)
  parts = []
  for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):  # torch's scan order inside the window
    hit = (xs[:, :, i, :, j] == y) & ~taken
    taken = taken | hit
    parts.append(jnp.where(hit, g, jnp.zeros_like(g)))
  top = jnp.stack(parts[:2], axis=3)
  bottom = jnp.stack(parts[2:], axis=3)
  return (jnp.stack([top, bottom], axis=2).reshape(x.shape),)


_max_pool2_even.defvjp(_max_pool2_fwd, _max_pool2_bwd)


def count_params(params) -> int:
  """Number of scalar parameters in a pytree."""
  return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))
