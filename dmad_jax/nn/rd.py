"""Reverse-distillation (RD4AD) student parts in Flax linen, NHWC: the OCBE bottleneck and the
"de-ResNet" decoder. DMAD-PPDM uses the same decoder and a VQ variant of the bottleneck.

Submodules are named after the RD4AD torch attributes (``bn.bn_layer.0.conv1``,
``decoder.layer1.0.upsample.0``, ...), so ``dmad_jax.convert.torch_to_flax`` converts an RD
checkpoint's ``bn`` / ``decoder`` state dicts directly.

Shapes for a 256x256 input and the wide_resnet50_2 teacher (resnet18 in brackets):

  teacher:  layer1 (N, 64, 64, 256 [64]), layer2 (N, 32, 32, 512 [128]),
            layer3 (N, 16, 16, 1024 [256])
  OCBE:     l1 = conv3 s2 (256 -> 512)-BN-ReLU-conv3 s2 (512 -> 1024)-BN-ReLU -> (N, 16, 16, 1024)
            l2 = conv3 s2 (512 -> 1024)-BN-ReLU                             -> (N, 16, 16, 1024)
            cat[l1, l2, layer3] (N, 16, 16, 3072 [768]) -> ResStage(planes 512, 3 [2] blocks, s2)
            -> (N, 8, 8, 2048 [512])
  decoder:  layer1 (planes 256, 3 [2] blocks) -> (N, 16, 16, 1024 [256])  pairs with teacher layer3
            layer2 (planes 128, 4 [2] blocks) -> (N, 32, 32, 512 [128])   pairs with teacher layer2
            layer3 (planes 64, 6 [2] blocks)  -> (N, 64, 64, 256 [64])    pairs with teacher layer1

The decoder returns its outputs keyed by the TEACHER stage they reconstruct ({"layer1": 256@64,
"layer2": 512@32, "layer3": 1024@16}), so the loss is a sum over matching keys.

Initialisation as RD4AD: ``nn.Conv2d`` kaiming-normal (fan_out, ReLU), BatchNorm 1 / 0; the
transposed convolutions are not ``nn.Conv2d`` there and keep torch's default init.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.nn import attention as attention_lib
from dmad_jax.nn.fast_conv import FastConvTranspose
from dmad_jax.nn.init import torch_default_kernel_init
from dmad_jax.nn.resnet import EXPANSION, ResStage, batch_norm, check_arch, conv

# Decoder stages as (torch name, planes, index into the arch's block counts). RD4AD builds
# layer1..layer3 from blocks[0..2] (wide_resnet50_2: 3, 4, 6 blocks), planes 256, 128, 64.
DECODER_STAGES = (("layer1", 256, 0), ("layer2", 128, 1), ("layer3", 64, 2))
# Residual blocks in the OCBE stage per arch (RD4AD: 2 for resnet18, 3 for the others).
OCBE_BLOCKS = {"resnet18": 2, "resnet34": 3, "resnet50": 3, "wide_resnet50_2": 3}
# Where ARD's attention block can sit in the OCBE (see OCBE).
ATTENTION_POSITIONS = ("fusion", "embedding")
# Which teacher stage each decoder stage reconstructs.
DECODER_TARGET = {"layer1": "layer3", "layer2": "layer2", "layer3": "layer1"}


def deconv2x2(features: int, name: str | None = None, dtype: Any = jnp.float32) -> nn.Module:
  """``nn.ConvTranspose2d(kernel 2, stride 2, bias=False)``: exactly doubles H and W.

  Torch's transposed convolution is Flax's ``ConvTranspose`` with ``transpose_kernel=True`` and
  padding k - 1 - p = 1 on each side; the kernel is (2, 2, out, in), torch's (in, out, 2, 2)
  transposed by (2, 3, 1, 0). Computed by output phases (``FastConvTranspose``).
  """
  return FastConvTranspose(
    features,
    (2, 2),
    strides=(2, 2),
    padding=((1, 1), (1, 1)),
    use_bias=False,
    kernel_init=torch_default_kernel_init,
    dtype=dtype,
    name=name,
  )


class Upsample(nn.Module):
  """The decoder's identity path ``Sequential(deconv2x2, BN)``; children "0" and "1"."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, 2H, 2W, features)."""
    x = deconv2x2(self.features, name="0", dtype=self.dtype)(x)
    return batch_norm(train, name="1", dtype=self.dtype)(x)


class DeBasicBlock(nn.Module):
  """RD ``DeBasicBlock``: like ``BasicBlock`` but with a 2x2 s2 transposed conv1 when upsampling.

  Attributes:
    planes: output channels.
    upsample: first block of a stage: conv1 is ``deconv2x2`` and the identity path ``Upsample``.
  """

  planes: int
  upsample: bool = False
  width_per_group: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, s H, s W, planes) with s = 2 if ``upsample`` else 1."""
    if self.upsample:
      h = deconv2x2(self.planes, name="conv1", dtype=self.dtype)(x)
    else:
      h = conv(self.planes, 3, name="conv1", dtype=self.dtype)(x)
    h = nn.relu(batch_norm(train, "bn1", self.dtype)(h))
    h = conv(self.planes, 3, name="conv2", dtype=self.dtype)(h)
    h = batch_norm(train, "bn2", self.dtype)(h)
    if self.upsample:
      x = Upsample(self.planes, self.dtype, name="upsample")(x, train)
    return nn.relu(h + x)


class DeBottleneck(nn.Module):
  """RD ``DeBottleneck``: conv1x1-BN-ReLU-[deconv2x2 s2 | conv3]-BN-ReLU-conv1x1-BN, + identity.

  Attributes:
    planes: base width; output ``4 * planes`` channels, inner ``planes * width_per_group // 64``.
    upsample: first block of a stage: the middle conv is ``deconv2x2`` and the identity path
      ``Upsample``.
    width_per_group: 64 or 128 (wide).
  """

  planes: int
  upsample: bool = False
  width_per_group: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, s H, s W, 4 * planes) with s = 2 if ``upsample`` else 1."""
    width = self.planes * self.width_per_group // 64
    h = conv(width, 1, name="conv1", dtype=self.dtype)(x)
    h = nn.relu(batch_norm(train, "bn1", self.dtype)(h))
    if self.upsample:
      h = deconv2x2(width, name="conv2", dtype=self.dtype)(h)
    else:
      h = conv(width, 3, name="conv2", dtype=self.dtype)(h)
    h = nn.relu(batch_norm(train, "bn2", self.dtype)(h))
    h = conv(4 * self.planes, 1, name="conv3", dtype=self.dtype)(h)
    h = batch_norm(train, "bn3", self.dtype)(h)
    if self.upsample:
      x = Upsample(4 * self.planes, self.dtype, name="upsample")(x, train)
    return nn.relu(h + x)


DE_BLOCKS = {"basic": DeBasicBlock, "bottleneck": DeBottleneck}


class DeResStage(nn.Module):
  """A decoder stage: the first block upsamples by 2, the others keep the size."""

  block: str
  planes: int
  blocks: int
  width_per_group: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """(N, H, W, C) -> (N, 2H, 2W, planes * expansion)."""
    cls = DE_BLOCKS[self.block]
    for i in range(self.blocks):
      x = cls(
        self.planes,
        upsample=i == 0,
        width_per_group=self.width_per_group,
        dtype=self.dtype,
        name=str(i),
      )(x, train)
    return x


class ResNetDecoder(nn.Module):
  """RD's student decoder ``de_<arch>`` (three upsampling stages), trained from scratch.

  Attributes:
    arch: the teacher's arch (resnet18, resnet34, resnet50, wide_resnet50_2).
  """

  arch: str = "wide_resnet50_2"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """(N, h, w, 512 * expansion) embedding -> {teacher stage: reconstruction}.

    Returns:
      {"layer3": (N, 2h, 2w, 256 e), "layer2": (N, 4h, 4w, 128 e), "layer1": (N, 8h, 8w, 64 e)}
      with e = 4 (bottleneck archs) or 1; keys name the teacher stage each output matches.
    """
    kind, layers, width_per_group = check_arch(self.arch)
    out = {}
    for name, planes, idx in DECODER_STAGES:
      x = DeResStage(kind, planes, layers[idx], width_per_group, self.dtype, name=name)(x, train)
      out[DECODER_TARGET[name]] = x
    return out


class OCBE(nn.Module):
  """RD's one-class bottleneck embedding (``BN_layer``, DMAD-PPDM's mode "px" / vq=False).

  Multi-scale fusion: layer1 goes through two conv3 s2 (conv1/bn1, conv2/bn2), layer2 through one
  (conv3/bn3), each followed by BN and ReLU, to layer3's size and width; the three are concatenated
  and one residual stage (``bn_layer``, planes 512, stride 2, attention-free ``AttnBottleneck`` =
  ``Bottleneck``) embeds them. RD defines an unused conv4/bn4; it is not created here
  (``convert.torch_to_flax`` ignores it via ``ignore=("conv4.", "bn4.")``).

  ARD (attention in the OCBE, a reconstruction: see ``dmad_jax.nn.attention``) adds one attention
  block (``attention``, child "attention") at ``attention_position``: "fusion", on the
  concatenated multi-scale features before the residual stage (it can weigh the three scales'
  channels and the locations before they are compressed), or "embedding", on the stage's output
  (the one-class embedding the decoder sees).

  Attributes:
    arch: the teacher's arch; fixes the block kind, widths and the stage's block count
      (``OCBE_BLOCKS``: RD's ``BN_layer(block, 2)`` for resnet18, 3 otherwise).
    attention: "none" (RD) or a kind of ``attention.ATTENTIONS`` (se, eca, cbam, sspcab).
    attention_position: "fusion" or "embedding".
  """

  arch: str = "wide_resnet50_2"
  attention: str = "none"
  attention_position: str = "fusion"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: dict[str, jax.Array], train: bool = False) -> jax.Array:
    """{"layer1", "layer2", "layer3"} teacher features -> (N, h / 2, w / 2, 512 * expansion).

    With h, w the layer3 size: for wide_resnet50_2 at 256x256, (N, 8, 8, 2048).
    """
    kind, _, width_per_group = check_arch(self.arch)
    if self.attention_position not in ATTENTION_POSITIONS:
      raise ValueError(
        f"OCBE: attention_position {self.attention_position!r} is not one of {ATTENTION_POSITIONS}"
      )
    attend = attention_lib.make_attention(self.attention, self.dtype, name="attention")
    e = EXPANSION[kind]
    l1 = conv(128 * e, 3, 2, name="conv1", dtype=self.dtype)(feats["layer1"])
    l1 = nn.relu(batch_norm(train, "bn1", self.dtype)(l1))
    l1 = conv(256 * e, 3, 2, name="conv2", dtype=self.dtype)(l1)
    l1 = nn.relu(batch_norm(train, "bn2", self.dtype)(l1))
    l2 = conv(256 * e, 3, 2, name="conv3", dtype=self.dtype)(feats["layer2"])
    l2 = nn.relu(batch_norm(train, "bn3", self.dtype)(l2))
    x = jnp.concatenate([l1, l2, feats["layer3"].astype(l1.dtype)], axis=-1)
    if attend is not None and self.attention_position == "fusion":
      x = attend(x)
    blocks = OCBE_BLOCKS.get(self.arch, 3)
    x = ResStage(
      kind,
      512,
      blocks,
      strides=2,
      width_per_group=width_per_group,
      dtype=self.dtype,
      name="bn_layer",
    )(x, train)
    if attend is not None and self.attention_position == "embedding":
      x = attend(x)
    return x
