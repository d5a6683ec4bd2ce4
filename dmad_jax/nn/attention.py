"""Attention blocks for NHWC feature maps: SE, ECA, CBAM and SSPCAB as Flax linen modules.

Every block maps an (N, H, W, C) input to an (N, H, W, C) output that reweights (SE, ECA, CBAM)
or re-predicts (SSPCAB) the input, so it can be dropped between any two layers of a model.
Each block is written from its published definition:

* `SqueezeExcitation`: Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018.
  s = sigmoid(fc2(relu(fc1(mean_hw(x))))) of shape (N, C); output x * s.
* `ECA`: Wang et al., "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
  Networks", CVPR 2020. s = sigmoid(conv1d_k(mean_hw(x))), the 1-D convolution running across
  the C channels with an adaptive kernel size k (`eca_kernel_size`); output x * s.
* `CBAM`: Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018.
  Channel attention Mc (N, C) from a shared MLP over average- and max-pooled features, then
  spatial attention Ms (N, H, W, 1) from a k x k convolution over the channel-wise mean and max;
  output (x * Mc) * Ms.
* `SSPCAB`: Ristea et al., "Self-Supervised Predictive Convolutional Attentive Block for Anomaly
  Detection", CVPR 2022. A convolution masked to the four corners of a K x K window (blind to
  the centre), ReLU, then a squeeze-and-excitation; it records its reconstruction error
  mean((out - x)^2) in the "losses" collection.

All blocks compute in `dtype` (the input is cast to it, so the output has dtype `dtype`); the
parameters are float32 and start from PyTorch's default initialisation of the corresponding
torch layers (`dmad_jax.nn.init`), like the rest of `dmad_jax.nn`.

`make_attention(kind)` builds a block with default hyper-parameters by name (`ATTENTIONS`), or
returns None for "none".
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.nn.init import torch_default_bias_init, torch_default_kernel_init

__all__ = [
  "ATTENTIONS",
  "CBAM",
  "ECA",
  "SSPCAB",
  "SqueezeExcitation",
  "eca_kernel_size",
  "make_attention",
]


def _check_nhwc(name: str, x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name} expects (N, H, W, C) inputs, got shape {x.shape}.")


def _dense(features: int, fan_in: int, dtype: Any, name: str) -> nn.Dense:
  """A Dense with bias and torch.nn.Linear's default initialisation, float32 parameters."""
  return nn.Dense(
    features,
    use_bias=True,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=torch_default_kernel_init,
    bias_init=torch_default_bias_init(fan_in),
    name=name,
  )


class SqueezeExcitation(nn.Module):
  """Squeeze-and-excitation channel attention (Hu et al., CVPR 2018).

  s = sigmoid(fc2(relu(fc1(mean_hw(x))))), output x * s[:, None, None, :].

  Parameters for C input channels and R = max(1, C // reduction):
    fc1/kernel (C, R), fc1/bias (R,), fc2/kernel (R, C), fc2/bias (C,).
  A torch `nn.Linear` weight (out, in) is the transpose of the Dense kernel (in, out).

  Attributes:
    reduction: channel reduction ratio r of the bottleneck.
    dtype: computation dtype (and output dtype); parameters are float32.
  """

  reduction: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Reweights the channels of `x`.

    Args:
      x: (N, H, W, C) input.

    Returns:
      (N, H, W, C) output in `dtype`.
    """
    _check_nhwc("SqueezeExcitation", x)
    x = jnp.asarray(x, self.dtype)
    c = x.shape[-1]
    hidden = max(1, c // self.reduction)
    y = jnp.mean(x, axis=(1, 2))
    y = nn.relu(_dense(hidden, c, self.dtype, "fc1")(y))
    s = nn.sigmoid(_dense(c, hidden, self.dtype, "fc2")(y))
    return x * s[:, None, None, :]


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
  """ECA's adaptive kernel size for C channels (Wang et al., CVPR 2020, eq. 12).

  t = int(|(log2(C) + b) / gamma|); k = t if t is odd else t + 1.

  Args:
    channels: number of channels C (>= 1).
    gamma: the paper's gamma.
    b: the paper's b.

  Returns:
    The odd kernel size k.
  """
  if channels < 1:
    raise ValueError(f"eca_kernel_size needs channels >= 1, got {channels}.")
  t = int(abs((math.log2(channels) + b) / gamma))
  return t if t % 2 else t + 1


class ECA(nn.Module):
  """Efficient channel attention (Wang et al., CVPR 2020).

  y = mean_hw(x) of shape (N, C) is treated as a length-C sequence with one feature; a 1-D
  convolution with kernel k, no bias and zero padding (k - 1) // 2 on both sides gives one logit
  per channel; s = sigmoid(logits), output x * s[:, None, None, :].

  k = `kernel_size` if it is > 0, else `eca_kernel_size(C, gamma, b)`. k must be odd, so that the
  symmetric padding keeps the length C.

  Parameters: conv/kernel (k, 1, 1) (length, in, out); a torch `nn.Conv1d(1, 1, k)` weight
  (1, 1, k) holds the same numbers.

  Attributes:
    gamma: the paper's gamma of the adaptive kernel size.
    b: the paper's b of the adaptive kernel size.
    kernel_size: fixed odd kernel size; 0 selects the adaptive size.
    dtype: computation dtype (and output dtype); parameters are float32.
  """

  gamma: int = 2
  b: int = 1
  kernel_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Reweights the channels of `x`.

    Args:
      x: (N, H, W, C) input.

    Returns:
      (N, H, W, C) output in `dtype`.

    Raises:
      ValueError: if the kernel size is even.
    """
    _check_nhwc("ECA", x)
    x = jnp.asarray(x, self.dtype)
    c = x.shape[-1]
    k = self.kernel_size if self.kernel_size > 0 else eca_kernel_size(c, self.gamma, self.b)
    if k % 2 == 0:
      raise ValueError(f"ECA needs an odd kernel size, got {k}.")
    pad = (k - 1) // 2
    y = jnp.mean(x, axis=(1, 2))[:, :, None]  # (N, C, 1): length C, one feature
    logits = nn.Conv(
      1,
      kernel_size=(k,),
      padding=[(pad, pad)],
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_default_kernel_init,
      name="conv",
    )(y)
    s = nn.sigmoid(logits[:, :, 0])
    return x * s[:, None, None, :]


class CBAM(nn.Module):
  """Convolutional block attention module (Woo et al., ECCV 2018): channel, then spatial.

  Channel attention: Mc = sigmoid(MLP(avgpool_hw(x)) + MLP(maxpool_hw(x))) of shape (N, C), with
  one MLP shared by both pooled vectors, Dense(R) -> ReLU -> Dense(C), R = max(1, C // reduction),
  both with bias (the second bias therefore enters Mc twice, as in the paper's formula).
  x1 = x * Mc.

  Spatial attention: Ms = sigmoid(conv_{k x k}(concat([mean_c(x1), max_c(x1)], -1))) of shape
  (N, H, W, 1): one convolution from 2 channels to 1, zero padding k // 2, no bias. Output x1 * Ms.

  This is the paper's formula (eq. 3). The authors' released code differs in two details that
  are not reproduced here: its spatial convolution is followed by a BatchNorm (before the
  sigmoid), and it stacks the pooled maps as [max, mean] instead of [mean, max].

  Parameters for C channels:
    mlp_fc1/kernel (C, R), mlp_fc1/bias (R,), mlp_fc2/kernel (R, C), mlp_fc2/bias (C,),
    spatial/kernel (k, k, 2, 1) (kh, kw, in = [mean, max], out).

  Sown into "intermediates" (recorded only when that collection is mutable):
    "channel_attention" (N, C) = Mc and "spatial_attention" (N, H, W, 1) = Ms.

  Attributes:
    reduction: channel reduction ratio of the shared MLP.
    spatial_kernel: odd size k of the spatial convolution.
    dtype: computation dtype (and output dtype); parameters are float32.
  """

  reduction: int = 16
  spatial_kernel: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies channel attention, then spatial attention.

    Args:
      x: (N, H, W, C) input.

    Returns:
      (N, H, W, C) output in `dtype`.

    Raises:
      ValueError: if `spatial_kernel` is even.
    """
    _check_nhwc("CBAM", x)
    k = self.spatial_kernel
    if k % 2 == 0:
      raise ValueError(f"CBAM needs an odd spatial_kernel, got {k}.")
    x = jnp.asarray(x, self.dtype)
    c = x.shape[-1]
    hidden = max(1, c // self.reduction)
    fc1 = _dense(hidden, c, self.dtype, "mlp_fc1")
    fc2 = _dense(c, hidden, self.dtype, "mlp_fc2")
    # The shared MLP on both pooled vectors at once: (2, N, C) -> (2, N, C).
    pooled = jnp.stack([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))])
    mlp = fc2(nn.relu(fc1(pooled)))
    mc = nn.sigmoid(mlp[0] + mlp[1])
    self.sow("intermediates", "channel_attention", mc)
    x1 = x * mc[:, None, None, :]

    maps = jnp.concatenate(
      [jnp.mean(x1, axis=-1, keepdims=True), jnp.max(x1, axis=-1, keepdims=True)], axis=-1
    )
    logits = nn.Conv(
      1,
      kernel_size=(k, k),
      padding=k // 2,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_default_kernel_init,
      name="spatial",
    )(maps)
    ms = nn.sigmoid(logits)
    self.sow("intermediates", "spatial_attention", ms)
    return x1 * ms


class SSPCAB(nn.Module):
  """Self-supervised predictive convolutional attentive block (Ristea et al., CVPR 2022).

  A masked convolution sees, around each pixel, only the four kernel_dim x kernel_dim corners of
  a K x K window, K = 2 * kernel_dim + 2 * dilation + 1: the centre and the `dilation`-wide
  cross between the corners are masked out, so the block has to predict each position from its
  surroundings. It maps C to C channels with a bias, and the zero padding kernel_dim + dilation
  keeps the size. Then ReLU and a `SqueezeExcitation(reduction)`.

  The masked convolution is four VALID kernel_dim x kernel_dim convolutions ("conv1".."conv4",
  each C -> C with bias) of the zero-padded input, taken at the window's four corners and summed:
  with o = kernel_dim + 2 * dilation + 1 the offset of the far corners,
    conv1: top-left (row offset 0, column offset 0),
    conv2: bottom-left (row offset o, column offset 0),
    conv3: top-right (row offset 0, column offset o),
    conv4: bottom-right (row offset o, column offset o).
  The four biases add up, so the effective bias is their sum.

  Parameters for C channels, k = kernel_dim, R = max(1, C // reduction):
    conv{1,2,3,4}/kernel (k, k, C, C) (kh, kw, in, out), conv{1,2,3,4}/bias (C,),
    se/fc1/kernel (C, R), se/fc1/bias (R,), se/fc2/kernel (R, C), se/fc2/bias (C,).
  A torch Conv2d weight (out, in, kh, kw) is the kernel transposed by (3, 2, 0, 1).

  The block also records its self-supervised reconstruction loss, mean((out - x)^2) computed in
  float32 with x the input cast to `dtype`, as `self.sow("losses", "sspcab", loss)`; it is only
  recorded when "losses" is mutable (and never by `init`, so the initial variables hold only
  "params"), and the caller weights it. The pre-ReLU output of the masked
  convolution, (N, H, W, C), is sown as "intermediates"/"masked_conv" (also only when mutable).

  Attributes:
    kernel_dim: size k of each corner sub-kernel.
    dilation: distance d between the centre and the corner sub-kernels.
    reduction: channel reduction ratio of the squeeze-and-excitation.
    dtype: computation dtype (and output dtype); parameters are float32.
  """

  kernel_dim: int = 1
  dilation: int = 1
  reduction: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Predicts `x` from the masked neighbourhood of each pixel and reweights the channels.

    Args:
      x: (N, H, W, C) input.

    Returns:
      (N, H, W, C) output in `dtype`.
    """
    _check_nhwc("SSPCAB", x)
    if self.kernel_dim < 1 or self.dilation < 0:
      raise ValueError(
        f"SSPCAB needs kernel_dim >= 1 and dilation >= 0, got {self.kernel_dim}, {self.dilation}."
      )
    x = jnp.asarray(x, self.dtype)
    _, h, w, c = x.shape
    k = self.kernel_dim
    pad = k + self.dilation
    far = k + 2 * self.dilation + 1  # offset of the bottom / right corner sub-kernels
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    # Each corner's VALID k x k convolution needs an (H + k - 1, W + k - 1) window.
    rows = {"top": slice(0, h + k - 1), "bottom": slice(far, far + h + k - 1)}
    cols = {"left": slice(0, w + k - 1), "right": slice(far, far + w + k - 1)}
    corners = [("top", "left"), ("bottom", "left"), ("top", "right"), ("bottom", "right")]
    y = None
    for i, (r, q) in enumerate(corners, start=1):
      out = nn.Conv(
        c,
        kernel_size=(k, k),
        padding="VALID",
        use_bias=True,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(k * k * c),
        name=f"conv{i}",
      )(xp[:, rows[r], cols[q], :])
      y = out if y is None else y + out
    self.sow("intermediates", "masked_conv", y)
    out = SqueezeExcitation(reduction=self.reduction, dtype=self.dtype, name="se")(nn.relu(y))
    loss = jnp.mean(jnp.square(out.astype(jnp.float32) - x.astype(jnp.float32)))
    if not self.is_initializing():  # a per-call output, not a variable for `init` to return
      self.sow("losses", "sspcab", loss)
    return out


ATTENTIONS: dict[str, type[nn.Module]] = {
  "se": SqueezeExcitation,
  "eca": ECA,
  "cbam": CBAM,
  "sspcab": SSPCAB,
}


def make_attention(
  kind: str, dtype: Any = jnp.float32, name: str | None = None
) -> nn.Module | None:
  """Builds an attention block with its default hyper-parameters by name.

  Args:
    kind: "none" or one of the keys of `ATTENTIONS` ("se", "eca", "cbam", "sspcab").
    dtype: computation dtype of the block.
    name: the module name (for a child created inside a parent's ``nn.compact`` method).

  Returns:
    The module, or None for "none".

  Raises:
    ValueError: for an unknown kind; the message lists the known ones.
  """
  if kind == "none":
    return None
  if kind not in ATTENTIONS:
    known = ", ".join(repr(name) for name in ["none", *ATTENTIONS])
    raise ValueError(f"Unknown attention kind {kind!r}; known kinds: {known}.")
  return ATTENTIONS[kind](dtype=dtype, name=name)
