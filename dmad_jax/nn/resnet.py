"""torchvision's ResNet-18/34/50 and Wide-ResNet-50-2 in Flax linen (NHWC), as feature extractors.

The architecture is torchvision's (``torchvision.models.resnet``, v1.5: in a ``Bottleneck`` the
stride sits on the 3x3 convolution), so ImageNet weights convert one to one
(``dmad_jax.convert.torchvision_resnet``). Every submodule is named after the torch attribute it
replaces: the torch key ``layer2.0.downsample.1.running_var`` is
``variables["batch_stats"]["layer2"]["0"]["downsample"]["1"]["var"]`` here.

Shapes for a (N, 256, 256, 3) input (H = W = 256; any size divisible by 32 works, other sizes
round like torch):

  ============  ==========================  =======================================
  stage         resnet18 / resnet34         resnet50 / wide_resnet50_2
  ============  ==========================  =======================================
  stem          (N, 64, 64, 64)             (N, 64, 64, 64)
  layer1        (N, 64, 64, 64)             (N, 64, 64, 256)
  layer2        (N, 32, 32, 128)            (N, 32, 32, 512)
  layer3        (N, 16, 16, 256)            (N, 16, 16, 1024)
  layer4        (N, 8, 8, 512)              (N, 8, 8, 2048)
  ============  ==========================  =======================================

(stem = conv 7x7 s2 - BN - ReLU - max-pool 3x3 s2; layer``k`` downsamples by 2 for k >= 2.) The
wide variant only widens the inner 3x3 convolutions (width_per_group 128), so its stage outputs
have the same channels as resnet50.

Inputs are expected ImageNet-normalised (``imagenet_normalize``). BatchNorm follows torch:
epsilon 1e-5, torch momentum 0.1 (Flax momentum 0.9); ``train=False`` (the default) uses the
running statistics, which is how a frozen teacher runs (RD4AD / DMAD-PPDM keep it in eval mode and
let gradients flow through it to its input).

Initialisation is torchvision's: convolutions kaiming-normal (fan_out, ReLU gain), BatchNorm
scale 1 and bias 0 (``zero_init_residual=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.nn.fast_conv import FastConv

STAGES = ("layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_MOMENTUM = 0.9  # torch momentum 0.1
BN_EPSILON = 1e-5

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out), not
# truncated; fan_out = out_channels * kh * kw for both layouts.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# name -> (block kind, blocks per stage, width_per_group); the torchvision constructors' arguments.
ARCHS: dict[str, tuple[str, tuple[int, int, int, int], int]] = {
  "resnet18": ("basic", (2, 2, 2, 2), 64),
  "resnet34": ("basic", (3, 4, 6, 3), 64),
  "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
  "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 128),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
STAGE_PLANES = (64, 128, 256, 512)


def check_arch(arch: str) -> tuple[str, tuple[int, int, int, int], int]:
  """Returns ``ARCHS[arch]`` or raises a ValueError naming the known architectures."""
  if arch not in ARCHS:
    raise ValueError(f"unknown ResNet arch {arch!r}; known: {', '.join(ARCHS)}")
  return ARCHS[arch]


def stage_channels(arch: str) -> dict[str, int]:
  """Output channels of each stage, e.g. wide_resnet50_2 -> {"layer1": 256, ..., "layer4": 2048}."""
  kind, _, _ = check_arch(arch)
  return {s: p * EXPANSION[kind] for s, p in zip(STAGES, STAGE_PLANES, strict=True)}


def imagenet_normalize(images: jax.Array, low: float = -1.0, high: float = 1.0) -> jax.Array:
  """Maps (..., 3) images with values in [low, high] to torchvision's ImageNet normalisation.

  dmad_jax's pipelines give images in [-1, 1]; torchvision's weights expect
  ``(x01 - mean) / std`` with x01 in [0, 1] (ToTensor + Normalize).
  """
  x01 = (images - low) / (high - low)
  mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
  std = jnp.asarray(IMAGENET_STD, images.dtype)
  return (x01 - mean) / std


def conv(
  features: int,
  kernel_size: int,
  strides: int = 1,
  name: str | None = None,
  dtype: Any = jnp.float32,
) -> nn.Conv:
  """``nn.Conv2d(bias=False)`` with torch's zero padding ``kernel_size // 2`` on each side."""
  p = kernel_size // 2
  return FastConv(
    features,
    (kernel_size, kernel_size),
    strides=strides,
    padding=((p, p), (p, p)),
    use_bias=False,
    kernel_init=kaiming_normal_fan_out,
    dtype=dtype,
    name=name,
  )


def batch_norm(train: bool, name: str | None = None, dtype: Any = jnp.float32) -> nn.BatchNorm:
  """``nn.BatchNorm2d`` (eps 1e-5, momentum 0.1): batch statistics iff ``train``."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    name=name,
  )


class Downsample(nn.Module):
  """The identity path's ``Sequential(conv1x1(stride), BN)``; children "0" and "1" as in torch."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, H / strides, W / strides, features)."""
    x = conv(self.features, 1, self.strides, name="0", dtype=self.dtype)(x)
    return batch_norm(train, name="1", dtype=self.dtype)(x)


class BasicBlock(nn.Module):
  """torchvision ``BasicBlock``: conv3(stride)-BN-ReLU-conv3-BN, + identity, ReLU (expansion 1).

  Attributes:
    planes: output channels.
    strides: stride of the first 3x3 convolution.
    downsample: whether the identity path is ``Downsample`` (torch: stride != 1 or
      in_channels != planes).
  """

  planes: int
  strides: int = 1
  downsample: bool = False
  width_per_group: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, H / strides, W / strides, planes)."""
    if self.width_per_group != 64:
      raise ValueError(f"BasicBlock supports only width_per_group=64, got {self.width_per_group}")
    h = conv(self.planes, 3, self.strides, name="conv1", dtype=self.dtype)(x)
    h = nn.relu(batch_norm(train, "bn1", self.dtype)(h))
    h = conv(self.planes, 3, name="conv2", dtype=self.dtype)(h)
    h = batch_norm(train, "bn2", self.dtype)(h)
    if self.downsample:
      x = Downsample(self.planes, self.strides, self.dtype, name="downsample")(x, train)
    return nn.relu(h + x)


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck`` (v1.5): conv1x1-BN-ReLU-conv3(stride)-BN-ReLU-conv1x1-BN + identity.

  Attributes:
    planes: the block's base width; the output has ``4 * planes`` channels and the inner
      convolutions ``planes * width_per_group // 64``.
    strides: stride of the 3x3 convolution (and of the downsample path).
    downsample: whether the identity path is ``Downsample`` (torch: stride != 1 or
      in_channels != 4 * planes).
    width_per_group: 64 (resnet50) or 128 (wide_resnet50_2).
  """

  planes: int
  strides: int = 1
  downsample: bool = False
  width_per_group: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, H / strides, W / strides, 4 * planes)."""
    width = self.planes * self.width_per_group // 64
    h = conv(width, 1, name="conv1", dtype=self.dtype)(x)
    h = nn.relu(batch_norm(train, "bn1", self.dtype)(h))
    h = conv(width, 3, self.strides, name="conv2", dtype=self.dtype)(h)
    h = nn.relu(batch_norm(train, "bn2", self.dtype)(h))
    h = conv(4 * self.planes, 1, name="conv3", dtype=self.dtype)(h)
    h = batch_norm(train, "bn3", self.dtype)(h)
    if self.downsample:
      x = Downsample(4 * self.planes, self.strides, self.dtype, name="downsample")(x, train)
    return nn.relu(h + x)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResStage(nn.Module):
  """torchvision ``ResNet._make_layer``: ``blocks`` blocks named "0", "1", ...

  The first block carries the stride and, when the stride is not 1 or the input width differs
  from the output width, the ``downsample`` path; the others keep the size. RD's OCBE reuses this
  with a concatenated multi-scale input (its first block's input is 3x wider).

  Attributes:
    block: "basic" or "bottleneck".
    planes: the blocks' ``planes`` (output channels = planes * expansion).
    blocks: number of blocks.
    strides: stride of the first block.
    width_per_group: Bottleneck width factor (64 or 128).
  """

  block: str
  planes: int
  blocks: int
  strides: int = 1
  width_per_group: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, H / strides, W / strides, planes * expansion)."""
    cls = BLOCKS[self.block]
    out = self.planes * EXPANSION[self.block]
    for i in range(self.blocks):
      first = i == 0
      x = cls(
        self.planes,
        strides=self.strides if first else 1,
        downsample=first and (self.strides != 1 or x.shape[-1] != out),
        width_per_group=self.width_per_group,
        dtype=self.dtype,
        name=str(i),
      )(x, train)
    return x


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """``nn.MaxPool2d(3, stride=2, padding=1)``: the padding is -inf, never picked."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nn.Module):
  """A torchvision ResNet trunk (no avg-pool / fc) returning its stage features.

  Attributes:
    arch: one of ``ARCHS`` (resnet18, resnet34, resnet50, wide_resnet50_2).
    stages: which stage outputs to return; the network stops after the last one requested, so
      ``("layer1", "layer2", "layer3")`` (RD / PPDM) creates no layer4 parameters.
    dtype: computation dtype (parameters stay float32).
  """

  arch: str = "wide_resnet50_2"
  stages: Sequence[str] = STAGES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Stage features of ImageNet-normalised images.

    Args:
      x: (N, H, W, 3) float images, ImageNet-normalised.
      train: BatchNorm on batch statistics (and ``batch_stats`` mutable) instead of the running
        averages. A frozen teacher uses the default False.

    Returns:
      {stage: (N, H_s, W_s, C_s)} for each requested stage (see the module docstring).
    """
    kind, layers, width_per_group = check_arch(self.arch)
    if not self.stages or any(s not in STAGES for s in self.stages):
      raise ValueError(f"ResNet stages must be a non-empty subset of {STAGES}, got {self.stages}")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet expects (N, H, W, 3) NHWC images, got shape {x.shape}")
    depth = max(STAGES.index(s) for s in self.stages) + 1
    h = conv(64, 7, 2, name="conv1", dtype=self.dtype)(x.astype(self.dtype))
    h = nn.relu(batch_norm(train, "bn1", self.dtype)(h))
    h = max_pool_3x3_s2(h)
    out = {}
    for i in range(depth):
      h = ResStage(
        kind,
        STAGE_PLANES[i],
        layers[i],
        strides=1 if i == 0 else 2,
        width_per_group=width_per_group,
        dtype=self.dtype,
        name=STAGES[i],
      )(h, train)
      if STAGES[i] in self.stages:
        out[STAGES[i]] = h
    return out


def get_backbone(
  arch: str = "wide_resnet50_2",
  stages: Sequence[str] = ("layer1", "layer2", "layer3"),
  dtype: Any = jnp.float32,
) -> ResNet:
  """The ResNet trunk ``arch`` returning ``stages`` (default: RD / PPDM's layer1-3).

  Weights: ``dmad_jax.convert.load_backbone(path, arch, stages)`` returns the module with
  converted ImageNet variables; ``module.init(rng, x)`` gives torchvision's random init.
  """
  check_arch(arch)
  return ResNet(arch=arch, stages=tuple(stages), dtype=dtype)
