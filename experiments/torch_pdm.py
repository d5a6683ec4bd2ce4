"""DMAD-PDM in PyTorch (NCHW), a twin of ``dmad_jax.models.pdm`` for timing and parity checks.

This is a transcription of this repository's Flax model and its Ped2 loss, not of any other
code base. Its module names follow the Flax parameter paths, so a state dict converts with
``dmad_jax.convert.torch_to_flax`` (``flax_variables`` below); tests/models/pdm_torch_twin_test.py
checks that the two compute the same outputs, loss and gradients from the same weights.
experiments/bench_train.py times it in the same run as the JAX step, so that the comparison
does not depend on how fast this machine happens to be that day.

Only the settings the benchmark uses are built: video or image input, an encoder mask, masked
aggregation, one background template, 1-D smoothness. torch is a test-only dependency.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmad_jax.models.pdm import LossWeights  # the Ped2 loss weights (a plain dataclass)
from dmad_jax.ops import filters as _filters  # the coordinate channels (plain numpy)


class _Conv(nn.Module):
  """``dmad_jax.nn.layers.Conv``: one Conv2d named ``Conv_0`` with padding k // 2."""

  def __init__(self, cin, cout, k=3, stride=1, bias=True):
    super().__init__()
    self.Conv_0 = nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias)

  def forward(self, x):
    return self.Conv_0(x)


class _CoordConv(nn.Module):
  """``dmad_jax.nn.coordconv.CoordConv``: a 3x3 conv over [x, 4 coordinate channels]."""

  def __init__(self, cin, cout, num_blocks, bias=False):
    super().__init__()
    self.num_blocks = num_blocks
    self.conv = nn.Conv2d(cin + 4, cout, 3, 1, 1, bias=bias)
    self._coords = {}

  def forward(self, x):
    size = x.shape[-1]
    if size not in self._coords:
      c = _filters.coord_channels(size, num_blocks=self.num_blocks)  # (S, S, 4)
      self._coords[size] = torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1)))
    coords = self._coords[size].to(x.dtype).expand(x.shape[0], -1, -1, -1)
    return self.conv(torch.cat([x, coords], 1))


def _bn(c):
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class _Basic(nn.Module):
  """[conv3 (no bias) - BN - ReLU] x 2; ``last_linear``: the second conv has a bias, no BN."""

  def __init__(self, cin, cout, coord_blocks=None, last_linear=False):
    super().__init__()
    self.last_linear = last_linear
    prefix = "CoordConv" if coord_blocks else "Conv"
    for i, (a, bias) in enumerate(((cin, False), (cout, last_linear))):
      conv = _CoordConv(a, cout, coord_blocks, bias) if coord_blocks else _Conv(a, cout, bias=bias)
      setattr(self, f"{prefix}_{i}", conv)
    self.convs = [f"{prefix}_0", f"{prefix}_1"]
    self.BatchNorm_0 = _bn(cout)
    if not last_linear:
      self.BatchNorm_1 = _bn(cout)

  def forward(self, x):
    x = F.relu(self.BatchNorm_0(getattr(self, self.convs[0])(x)))
    x = getattr(self, self.convs[1])(x)
    return x if self.last_linear else F.relu(self.BatchNorm_1(x))


class _Upsample(nn.Module):
  """ConvTranspose2d(k3, s2, p1, output_padding 1, no bias) - BN - ReLU."""

  def __init__(self, cin, cout):
    super().__init__()
    self.ConvTranspose_0 = nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1, bias=False)
    self.BatchNorm_0 = _bn(cout)

  def forward(self, x):
    return F.relu(self.BatchNorm_0(self.ConvTranspose_0(x)))


class _Head(nn.Module):
  """conv3-BN-ReLU-conv3-BN-ReLU-conv3(bias)-tanh|sigmoid."""

  def __init__(self, cin, features, cout, activation):
    super().__init__()
    self.activation = activation
    self.Conv_0 = _Conv(cin, features, bias=False)
    self.BatchNorm_0 = _bn(features)
    self.Conv_1 = _Conv(features, features, bias=False)
    self.BatchNorm_1 = _bn(features)
    self.Conv_2 = _Conv(features, cout, bias=True)

  def forward(self, x):
    x = F.relu(self.BatchNorm_0(self.Conv_0(x)))
    x = F.relu(self.BatchNorm_1(self.Conv_1(x)))
    x = self.Conv_2(x)
    return torch.tanh(x) if self.activation == "tanh" else torch.sigmoid(x)


class _ResBlock(nn.Module):
  """x + [ReLU, conv3 (bias), BN, ReLU, conv1x1 (bias)](x)."""

  def __init__(self, c):
    super().__init__()
    self.Conv_0 = _Conv(c, c, 3)
    self.BatchNorm_0 = _bn(c)
    self.Conv_1 = _Conv(c, c, 1)

  def forward(self, x):
    return x + self.Conv_1(F.relu(self.BatchNorm_0(self.Conv_0(F.relu(x)))))


class _Encoder(nn.Module):
  def __init__(self, cin, channels, skip_channels, mask_channels):
    super().__init__()
    depth = len(channels)
    prev = cin
    for level, c in enumerate(channels):
      setattr(self, f"conv{level + 1}", _Basic(prev, c, last_linear=level == depth - 1))
      prev = c
    self.first_skip = depth - len(skip_channels)
    for i, c in enumerate(skip_channels):
      level = self.first_skip + i
      setattr(self, f"skip{level + 1}", _Basic(channels[level], c))
    self.depth, self.num_skips = depth, len(skip_channels)
    self.mask_up = _Upsample(channels[1], channels[0])
    self.mask = _Head(2 * channels[0], channels[0], mask_channels, "sigmoid")

  def forward(self, x):
    feats = []
    for level in range(self.depth):
      if level:
        x = F.max_pool2d(x, 2)
      x = getattr(self, f"conv{level + 1}")(x)
      feats.append(x)
    skips = {}
    for i in range(self.num_skips):
      level = self.first_skip + i
      skips[level] = getattr(self, f"skip{level + 1}")(feats[level].detach())
    up = self.mask_up(feats[1])
    mask = self.mask(torch.cat([up, feats[0]], 1))
    return feats[-1], skips, mask


class _Decoder(nn.Module):
  def __init__(self, channels, skip_channels, out_channels, coord_blocks, gen_features):
    super().__init__()
    depth = len(channels)
    first_skip = depth - len(skip_channels)
    prev = channels[-1]
    for level in range(depth - 1, 0, -1):
      cin = prev + (skip_channels[level - first_skip] if level >= first_skip else 0)
      setattr(self, f"dec{level + 1}", _Basic(cin, channels[level], coord_blocks))
      setattr(self, f"up{level}", _Upsample(channels[level], channels[level - 1]))
      prev = channels[level - 1]
    self.gen = _Head(channels[0], gen_features, out_channels, "tanh")
    self.depth = depth

  def forward(self, q, skips):
    h = q
    for level in range(self.depth - 1, 0, -1):
      if level in skips:
        h = torch.cat([h, skips[level]], 1)
      h = getattr(self, f"dec{level + 1}")(h)
      h = getattr(self, f"up{level}")(h)
    return self.gen(h)


class _OffsetNet(nn.Module):
  def __init__(self, cin, features, head_strides, max_offsets, coord_blocks):
    super().__init__()
    f = features
    self.CoordConv_0 = _CoordConv(cin, f, coord_blocks)
    self.BatchNorm_0 = _bn(f)
    self.CoordConv_1 = _CoordConv(f, f, coord_blocks)
    self.BatchNorm_1 = _bn(f)
    self.ResBlock_0 = _ResBlock(f)
    self.BatchNorm_2 = _bn(f)
    conv_i, bn_i = 0, 3
    self.heads = []  # per head: [(conv name, bn name or None)]
    for strides in head_strides:
      layers, prev = [], 2 * f
      for j, s in enumerate(strides):
        last = j == len(strides) - 1
        setattr(self, f"Conv_{conv_i}", _Conv(prev, 2 if last else f, 3, s))
        bn = None
        if not last:
          bn = f"BatchNorm_{bn_i}"
          setattr(self, bn, _bn(f))
          bn_i += 1
        layers.append((f"Conv_{conv_i}", bn))
        conv_i, prev = conv_i + 1, f
      self.heads.append(layers)
    self.max_offsets = tuple(max_offsets)

  def forward(self, x):
    size = x.shape[-1]
    h = F.relu(self.BatchNorm_0(self.CoordConv_0(x)))
    f1 = F.relu(self.BatchNorm_1(self.CoordConv_1(h)))
    f2 = self.BatchNorm_2(self.ResBlock_0(f1))
    trunk = torch.cat([f2, f1], 1)
    offsets = []
    for layers, max_px in zip(self.heads, self.max_offsets, strict=True):
      h = trunk
      for conv, bn in layers:
        h = getattr(self, conv)(h)
        if bn is not None:
          h = F.relu(getattr(self, bn)(h))
      offsets.append(torch.tanh(h) * (2.0 * max_px / size))
    return offsets


class _VQ(nn.Module):
  def __init__(self, num_codes, dim):
    super().__init__()
    self.codebook = nn.Parameter(
      torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes)
    )

  def forward(self, z):
    """z (N, D, h, w) -> (straight-through quantised z, codebook loss, commitment loss / beta)."""
    n, d, h, w = z.shape
    rows = z.permute(0, 2, 3, 1).reshape(-1, d)
    dist = (rows**2).sum(1, keepdim=True) - 2 * rows @ self.codebook.t()
    dist = dist + (self.codebook**2).sum(1)[None]
    q = self.codebook[dist.argmin(1)].reshape(n, h, w, d).permute(0, 3, 1, 2)
    codebook_loss = F.mse_loss(q, z.detach())
    commitment = F.mse_loss(q.detach(), z)
    return z + (q - z).detach(), codebook_loss, commitment


def _identity_grid(n, h, w, dtype):
  gy, gx = torch.meshgrid(
    torch.linspace(-1, 1, h, dtype=dtype), torch.linspace(-1, 1, w, dtype=dtype), indexing="ij"
  )
  return torch.stack([gx, gy], -1).expand(n, h, w, 2)


class TorchPDM(nn.Module):
  """DMAD-PDM with the Ped2 defaults of ``dmad_jax.models.pdm.PDM`` (encoder mask, masked
  aggregation); argument names are that class's attributes."""

  def __init__(
    self,
    image_size: int = 256,
    in_channels: int = 12,
    out_channels: int = 3,
    channels: Sequence[int] = (32, 64, 128, 256),
    skip_channels: Sequence[int] = (32, 32),
    num_codes: int = 200,
    vq_beta: float = 0.25,
    gen_features: int = 32,
    offset_features: int = 64,
    head_strides: Sequence[Sequence[int]] = ((1, 2, 2), (1, 1)),
    max_offsets: Sequence[float] = (2.0, 3.0),
    coord_blocks: int | None = None,
  ):
    super().__init__()
    coord = coord_blocks or max(1, image_size // 8)
    self.image_size, self.vq_beta = image_size, vq_beta
    self.encoder = _Encoder(in_channels, channels, skip_channels, out_channels)
    self.vq = _VQ(num_codes, channels[-1])
    self.decoder = _Decoder(channels, skip_channels, out_channels, coord, gen_features)
    self.offset_net = _OffsetNet(in_channels, offset_features, head_strides, max_offsets, coord)
    self.template = nn.Parameter(torch.zeros(1, out_channels, image_size, image_size))

  def forward(self, x):
    """x (N, in_channels, H, W) -> dict of NCHW outputs (``stages``, ``offsets`` (N, 2, H, W),
    ``reference``, ``mask``, ``template``, ``codebook_loss``, ``commitment_loss`` (beta
    applied))."""
    n, size = x.shape[0], self.image_size
    bkg = self.template.detach()
    z, skips, mask = self.encoder(x)
    q, codebook_loss, commitment = self.vq(z)
    ref = self.decoder(q, skips)
    offsets = [
      F.interpolate(o, size=(size, size), mode="bilinear", align_corners=True)
      for o in self.offset_net(x)
    ]
    identity = _identity_grid(n, size, size, x.dtype)
    t, m, stages = ref, mask, []
    for o in offsets:
      grid = (identity + o.permute(0, 2, 3, 1)).clamp(-1, 1)
      t = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
      m = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
      stages.append(t * m + (1 - m) * bkg)
    return dict(
      stages=stages,
      offsets=offsets,
      reference=ref,
      mask=mask,
      template=self.template,
      codebook_loss=codebook_loss,
      commitment_loss=self.vq_beta * commitment,
    )


# ---------------------------------------------------------------------------------------------
# The Ped2 loss (dmad_jax.models.pdm.pdm_loss with the LossWeights defaults).


def _backward_diff(s, dim):
  pad = (1, 0, 0, 0) if dim == 3 else (0, 0, 1, 0)
  padded = F.pad(s, pad)
  return s - (padded[..., :, :-1] if dim == 3 else padded[..., :-1, :])


def gradient_difference(x, y):
  """(N, 1, H, W) |dx(x) - dx(y)| + |dy(x) - dy(y)| of the channel sums, first row/col raw."""
  sx, sy = x.sum(1, keepdim=True), y.sum(1, keepdim=True)
  return (_backward_diff(sx, 3) - _backward_diff(sy, 3)).abs() + (
    _backward_diff(sx, 2) - _backward_diff(sy, 2)
  ).abs()


def smoothness_1d(o, ks):
  s = o.sum(1, keepdim=True)
  k = torch.from_numpy(_filters.smoothness_kernel_1d(ks)).to(o.dtype)  # float32 taps, as in JAX
  fx = F.conv2d(s, k.view(1, 1, 1, ks), padding=(0, ks // 2))
  fy = F.conv2d(s, k.view(1, 1, ks, 1), padding=(ks // 2, 0))
  return (fx.abs() + fy.abs()).mean()


def pdm_loss(out, target, weights: LossWeights | None = None):
  """The total training loss; ``target`` (N, C, H, W). Only the Ped2 terms of ``weights`` are
  built (no foreground weighting, mask or masked-template terms; 1-D smoothness)."""
  w_ = weights or LossWeights()
  recon, grad, vq, offset = w_.recon, w_.grad, w_.vq, w_.offset
  norm, smooth_sizes, template = w_.norm, w_.smooth_sizes, w_.template
  stages, offsets = out["stages"], out["offsets"]
  total = sum(w * F.mse_loss(s, target) for w, s in zip(recon, stages, strict=True))
  total = total + sum(
    w * gradient_difference(target, s).mean() for w, s in zip(grad, stages, strict=True)
  )
  total = total + vq * (out["codebook_loss"] + out["commitment_loss"])
  reg = sum(w * o.norm(dim=1).mean() for w, o in zip(norm, offsets, strict=True))
  reg = reg + sum(smoothness_1d(o, ks) for ks, o in zip(smooth_sizes, offsets, strict=True))
  total = total + offset * reg
  return total + template * ((out["template"] - target) ** 2).mean()


def make_optimizer(model: TorchPDM, lr=2e-4, weight_decay=0.01, template_multiplier=50.0):
  """AdamW with the template's larger learning rate (the Ped2 config's optimizer, constant lr)."""
  rest = [p for name, p in model.named_parameters() if name != "template"]
  return torch.optim.AdamW(
    [{"params": rest}, {"params": [model.template], "lr": lr * template_multiplier}],
    lr=lr,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=weight_decay,
  )


def train_step(model, optimizer, frames, out_channels=3):
  """One training step on ``frames`` (N, in + out channels, H, W); returns the loss."""
  model.train()
  x, target = frames[:, :-out_channels], frames[:, -out_channels:]
  optimizer.zero_grad(set_to_none=True)
  loss = pdm_loss(model(x), target)
  loss.backward()
  optimizer.step()
  return loss.detach()


def box_filter_max(x, kh, kw):
  """(N,) max of the (kh, kw) box average of the channel-summed |x|, zero-padded by the full
  kernel size on each side (``dmad_jax.ops.filters.box_filter_max``)."""
  s = F.pad(x.abs().sum(1, keepdim=True), (kw, kw, kh, kh))
  return F.avg_pool2d(s, (kh, kw), stride=1).flatten(1).amax(1)


@torch.no_grad()
def eval_step(model, frames, out_channels=3):
  """What ``PDMDetector.predict`` computes with the Ped2 config: the forward pass in eval mode,
  the Eq. 12-13 maps (``dis`` distance), the Eq. 14 scores (3x3 box max, alpha 1) and the
  official Ped2 frame errors. Returns {name: (N,) tensor}."""
  model.eval()
  x, target = frames[:, :-out_channels], frames[:, -out_channels:]
  out = model(x)
  pred, offsets = out["stages"][-1], out["offsets"]
  grad = gradient_difference(target, pred)
  rec = ((pred - target) ** 2).mean(1, keepdim=True) + grad
  df = sum(o.norm(dim=1, keepdim=True) for o in offsets)
  scores = {"rec": box_filter_max(rec, 3, 3), "df": box_filter_max(df, 3, 3)}
  scores["score"] = scores["rec"] + scores["df"]
  scores["ped2_deformation"] = box_filter_max(offsets[0][:, 1:2], 7, 18)
  scores["ped2_reconstruction"] = (pred - target).abs().flatten(1).mean(1)
  scores["ped2_gradient"] = box_filter_max(grad, 16, 14)
  return scores


# ---------------------------------------------------------------------------------------------
# Weights to Flax.


def flax_variables(model: TorchPDM, template_variables):
  """The Flax ``{"params", "batch_stats"}`` of ``dmad_jax.models.pdm.PDM`` holding ``model``'s
  weights; ``template_variables`` (arrays or shape structs) fixes the tree."""
  from flax import traverse_util

  from dmad_jax import convert

  flat = traverse_util.flatten_dict(dict(template_variables))
  special = {("params", "template"), ("params", "vq", "codebook")}
  rest = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in special})
  sd = {k: v for k, v in model.state_dict().items() if k not in ("template", "vq.codebook")}
  variables = traverse_util.flatten_dict(convert.torch_to_flax(sd, rest, what="PDM"))
  variables[("params", "template")] = model.template.detach().permute(0, 2, 3, 1).numpy()
  variables[("params", "vq", "codebook")] = model.vq.codebook.detach().numpy()
  return traverse_util.unflatten_dict(variables)
