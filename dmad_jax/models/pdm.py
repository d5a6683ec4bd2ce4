"""DMAD-PDM: reconstruction through an information bottleneck plus a pyramid of deformations.

The model (DMAD, CVPR 2023, Sec. 3; implementation facts in shared/spec/seed_systems.md Sec. 1)
has four parts:

* an encoder whose deepest feature is vector-quantised (the "information compression module");
  the two deepest encoder features also reach the decoder through narrow *stop-gradient* skips;
* a CoordConv decoder that reconstructs a prototypical *reference* from the quantised code;
* an OffsetNet that looks at the *input* and predicts K offset fields, coarse to fine, each a
  tanh scaled to at most ``max_offsets[k]`` pixels;
* a foreground mask and a learnable background template: the reference and the mask are warped
  by the chained fields, and the background fills what the warped mask leaves out.

Image mode reconstructs the input (``t_length=1``); video mode stacks ``t_length - 1`` frames
on the channel axis and predicts the next frame. The deformation magnitude measures how far a
sample is from its prototype; the reconstruction error after deformation measures what the
prototype cannot explain. ``anomaly_maps`` / ``image_scores`` implement the paper's Eq. 12-14
and ``frame_errors`` the official per-frame errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.models import base
from dmad_jax.nn import precision
from dmad_jax.nn.coordconv import CoordConv
from dmad_jax.nn.layers import Basic, Conv, Head, ResBlock, Upsample, batch_norm, max_pool2
from dmad_jax.nn.quantize import VectorQuantizer
from dmad_jax.ops import filters, sampling
from dmad_jax.ops.augment import random_shifts


class Encoder(nn.Module):
  """Basic blocks with 2x2 max pooling; the deepest block is ``Basic_`` (linear output).

  Attributes:
    channels: width per level, shallow to deep (Ped2: 32, 64, 128, 256).
    skip_channels: widths of the compressed skips of the deepest ``len(skip_channels)`` levels,
      shallow to deep (Ped2: 32, 32 for levels 3 and 4).
    mask_channels: channels of the encoder foreground mask; 0 disables it.
  """

  channels: Sequence[int]
  skip_channels: Sequence[int]
  mask_channels: int = 3

  @nn.compact
  def __call__(self, x, train):
    feats = []
    for level, c in enumerate(self.channels):
      if level:
        x = max_pool2(x)
      last = level == len(self.channels) - 1
      x = Basic(c, last_linear=last, name=f"conv{level + 1}")(x, train)
      feats.append(x)
    # The skips are trained by the decoder loss, but no gradient reaches the encoder through
    # them (stop-gradient on the encoder features, not on the skip outputs).
    first = len(self.channels) - len(self.skip_channels)
    skips = {
      first + i: Basic(c, name=f"skip{first + i + 1}")(
        jax.lax.stop_gradient(feats[first + i]), train
      )
      for i, c in enumerate(self.skip_channels)
    }
    mask = None
    if self.mask_channels:
      up = Upsample(self.channels[0], name="mask_up")(feats[1], train)
      mask = Head(self.channels[0], self.mask_channels, "sigmoid", name="mask")(
        jnp.concatenate([up, feats[0]], -1), train
      )
    return feats[-1], skips, mask


class Decoder(nn.Module):
  """Mirror of the encoder with CoordConv Basic blocks; ``Gen`` head with tanh output.

  Attributes:
    channels: encoder widths, shallow to deep.
    out_channels: channels of the reconstruction.
    coord_blocks: ``num_blocks`` of every CoordConv.
    gen_features: width of the generator head.
    mask_channels: channels of a decoder-side mask (ShanghaiTech recipe); 0 disables it.
  """

  channels: Sequence[int]
  out_channels: int
  coord_blocks: int
  gen_features: int
  mask_channels: int = 0

  @nn.compact
  def __call__(self, q, skips, train):
    depth = len(self.channels)
    h = q
    for level in range(depth - 1, 0, -1):  # 0-based level index, deep to shallow
      if level in skips:
        h = jnp.concatenate([h, skips[level]], -1)
      h = Basic(self.channels[level], self.coord_blocks, name=f"dec{level + 1}")(h, train)
      h = Upsample(self.channels[level - 1], name=f"up{level}")(h, train)
    ref = Head(self.gen_features, self.out_channels, "tanh", name="gen")(h, train)
    mask = None
    if self.mask_channels:
      mask = Head(self.gen_features, self.mask_channels, "sigmoid", name="mask")(h, train)
    return ref, mask


class OffsetNet(nn.Module):
  """Predicts K offset fields from the input frames.

  Trunk: CoordConv-BN-ReLU x 2 -> f1; f2 = BN(ResBlock(f1)); x = [f2, f1]. Head k: convs with
  ``head_strides[k]`` (all but the last followed by BN-ReLU, the last one maps to 2 channels),
  tanh, scaled by 2 * max_offsets[k] / H so that the field moves at most that many pixels.

  Attributes:
    features: trunk and head width (64).
    head_strides: strides of each head's convolutions, coarse head first.
    max_offsets: maximal displacement in pixels of each head.
    coord_blocks: ``num_blocks`` of the trunk's CoordConvs.
  """

  features: int
  head_strides: Sequence[Sequence[int]]
  max_offsets: Sequence[float]
  coord_blocks: int

  @nn.compact
  def __call__(self, x, train):
    size = x.shape[1]
    f = self.features
    h = CoordConv(f, num_blocks=self.coord_blocks)(x)
    h = nn.relu(batch_norm(train)(h))
    h = CoordConv(f, num_blocks=self.coord_blocks)(h)
    f1 = nn.relu(batch_norm(train)(h))
    f2 = batch_norm(train)(ResBlock()(f1, train))
    trunk = jnp.concatenate([f2, f1], -1)
    offsets = []
    for strides, max_px in zip(self.head_strides, self.max_offsets, strict=True):
      h = trunk
      for s in strides[:-1]:
        h = Conv(f, 3, strides=s)(h)
        h = nn.relu(batch_norm(train)(h))
      h = Conv(2, 3, strides=strides[-1])(h)
      offsets.append(jnp.tanh(h) * (2.0 * max_px / size))
    return offsets


OFFSET_INPUTS = ("input", "input_reference")


class PDM(nn.Module):
  """DMAD-PDM. See the module docstring; attribute names follow the config keys.

  Attributes:
    image_size: H = W of the input; must be divisible by 2 ** (len(channels) - 1).
    in_channels: channels of the input stack (video: 3 * (t_length - 1); image mode: 3 or 1).
    out_channels: channels of the reconstruction.
    channels: encoder widths per level, shallow to deep.
    skip_channels: compressed stop-gradient skips of the deepest levels.
    num_codes: codebook size K of the vector quantiser (its dimension is ``channels[-1]``).
    vq_beta: commitment weight.
    vq_update: "loss" (a codebook parameter trained by the codebook loss, the released code) or
      "ema" (a moving average of the assigned features in ``batch_stats``, with codes that fall
      out of use restarted at the worst-quantised features).
    vq_decay, vq_dead_threshold: the "ema" codebook's decay and restart threshold.
    gen_features: width of the generator head (None: ``channels[0]``).
    offset_features: OffsetNet width.
    head_strides: strides of each deformation head, coarse first (K = len(head_strides)).
    max_offsets: maximal displacement per head, in pixels.
    coord_blocks: CoordConv ``num_blocks`` (None: image_size // 8, i.e. 32 at 256 as in DMAD).
    mask_source: "encoder" (Ped2/Avenue: 3-channel mask from conv1/conv2) or "decoder"
      (ShanghaiTech: 1-channel mask from the last decoder feature) or "none".
    aggregation: "masked" (x_k = t_k m_k + (1 - m_k) sg(bkg)) or "additive" (ShanghaiTech:
      the reference is multiplied by the mask before warping and x_k = t_k + (1 - m_k) sg(bkg)).
    num_templates: number of trained background templates (1; ShanghaiTech: one per scene, or
      one per training video in the official transductive setting).
    frozen_templates: extra templates after the trained ones that no loss updates (the
      official ShanghaiTech test-video templates, estimated from test frames); they live in the
      separate parameter ``template_frozen`` so that the optimizer can leave them alone.
    template_input: append the (stop-gradient) template of each sample to the encoder and
      OffsetNet input (ShanghaiTech: 12 frame channels + 3 template channels = 15).
    warp_mask: warp the mask with the same fields as the reference (the released code: m_k =
      warp(m_{k-1}, O_k)); False is paper Eq. 9, where every stage uses the unwarped mask
      f_m(x): x_k = t_k * m + (1 - m) * bkg.
    global_code: average the deepest encoder feature over space before quantising and give
      the decoder that one code at every position (its CoordConvs supply where): the decoder
      can then produce at most ``num_codes`` references, a bank of prototypes (image mode on
      small images; the released models quantise every position, False).
    offset_input: what the OffsetNet sees: "input" (the released code) or "input_reference"
      (the input and the decoded reference side by side, so that the fields can depend on
      which prototype they warp).
  """

  image_size: int = 256
  in_channels: int = 12
  out_channels: int = 3
  channels: Sequence[int] = (32, 64, 128, 256)
  skip_channels: Sequence[int] = (32, 32)
  num_codes: int = 200
  vq_beta: float = 0.25
  vq_update: str = "loss"
  vq_decay: float = 0.99
  vq_dead_threshold: float = 0.01
  gen_features: int | None = None
  offset_features: int = 64
  head_strides: Sequence[Sequence[int]] = ((1, 2, 2), (1, 1))
  max_offsets: Sequence[float] = (2.0, 3.0)
  coord_blocks: int | None = None
  mask_source: str = "encoder"
  aggregation: str = "masked"
  num_templates: int = 1
  frozen_templates: int = 0
  template_input: bool = False
  warp_mask: bool = True
  global_code: bool = False
  offset_input: str = "input"

  def setup(self):
    depth = len(self.channels)
    if self.image_size % (2 ** (depth - 1)):
      raise ValueError(
        f"PDM: image_size {self.image_size} must be divisible by 2**{depth - 1} "
        f"(one 2x pooling per level of channels={tuple(self.channels)})"
      )
    if len(self.head_strides) != len(self.max_offsets):
      raise ValueError(
        f"PDM: head_strides has {len(self.head_strides)} heads but max_offsets has "
        f"{len(self.max_offsets)} values"
      )
    if self.mask_source not in ("encoder", "decoder", "none"):
      raise ValueError(f"PDM: mask_source must be encoder|decoder|none, got {self.mask_source!r}")
    if self.aggregation not in ("masked", "additive"):
      raise ValueError(f"PDM: aggregation must be masked|additive, got {self.aggregation!r}")
    if self.offset_input not in OFFSET_INPUTS:
      raise ValueError(
        f"PDM: offset_input must be one of {OFFSET_INPUTS}, got {self.offset_input!r}"
      )
    coord = self.coord_blocks or max(1, self.image_size // 8)
    mask_ch = self.out_channels if self.mask_source == "encoder" else 0
    self.encoder = Encoder(self.channels, self.skip_channels, mask_ch)
    self.vq = VectorQuantizer(
      self.num_codes,
      self.channels[-1],
      beta=self.vq_beta,
      update=self.vq_update,
      decay=self.vq_decay,
      dead_threshold=self.vq_dead_threshold,
    )
    self.decoder = Decoder(
      self.channels,
      self.out_channels,
      coord,
      self.gen_features or self.channels[0],
      1 if self.mask_source == "decoder" else 0,
    )
    self.offset_net = OffsetNet(self.offset_features, self.head_strides, self.max_offsets, coord)
    shape = (self.num_templates, self.image_size, self.image_size, self.out_channels)
    self.template = self.param("template", nn.initializers.zeros, shape)
    if self.frozen_templates:
      shape = (self.frozen_templates, *shape[1:])
      self.template_frozen = self.param("template_frozen", nn.initializers.zeros, shape)

  def __call__(self, x, *, train: bool, template_index=None, code_rank=None) -> dict[str, Any]:
    """Runs the model.

    Args:
      x: (B, H, W, in_channels) input (image, or stacked past frames), in [-1, 1].
      train: BatchNorm mode.
      template_index: (B,) int index into the template bank (None: template 0); indices from
        ``num_templates`` on select the frozen templates.
      code_rank: with ``global_code``, decode the ``code_rank``-th nearest code (an int or a
        traced int32; 0 is the nearest) instead of quantising as in training, i.e. the image's
        next prototypes (inference only). None: the nearest, as in training.

    Returns:
      A dict: ``reference`` (B,H,W,C) decoded prototype; ``mask`` (B,H,W,Cm) or None;
      ``offsets`` list of K full-resolution (B,H,W,2) fields; ``stages`` list of K
      reconstructions x_1..x_K (``prediction`` = x_K); ``warped`` the warped references t_k;
      ``masks`` the warped masks m_k; ``template`` (B,H,W,C); ``vq`` the quantiser's aux record.
    """
    size = self.image_size
    if x.shape[1:3] != (size, size):
      raise ValueError(f"PDM: expected inputs of {size}x{size}, got {x.shape}")
    idx = jnp.zeros((x.shape[0],), jnp.int32) if template_index is None else template_index
    idx = jnp.asarray(idx, jnp.int32)
    template = self.template[jnp.clip(idx, 0, self.num_templates - 1)]
    if self.frozen_templates:
      # Two gathers of B templates each instead of concatenating the whole bank every step.
      frozen = self.template_frozen[jnp.clip(idx - self.num_templates, 0, None)]
      is_frozen = (idx >= self.num_templates)[:, None, None, None]
      template = jnp.where(is_frozen, jax.lax.stop_gradient(frozen), template)
    bkg = jax.lax.stop_gradient(template)
    if self.template_input:
      x = jnp.concatenate([x, bkg.astype(x.dtype)], -1)

    if code_rank is not None and not self.global_code:
      raise ValueError(f"PDM: code_rank {code_rank} needs global_code=True (one code per image)")
    z, skips, mask = self.encoder(x, train)
    if self.global_code:
      q, vq_aux = self.vq(jnp.mean(z, axis=(1, 2), keepdims=True), train, rank=code_rank)
      q = jnp.broadcast_to(q, z.shape)
    else:
      q, vq_aux = self.vq(z, train)
    ref, dec_mask = self.decoder(q, skips, train)
    if mask is None:
      mask = dec_mask
    # The reference is an image output, kept float32 (dmad_jax.nn.precision); the OffsetNet
    # computes in the input's dtype.
    offset_in = x
    if self.offset_input == "input_reference":
      offset_in = jnp.concatenate([x, ref.astype(x.dtype)], -1)
    # Sampling coordinates are float32 whatever the compute dtype (dmad_jax.nn.precision).
    offsets = [
      sampling.resize_bilinear(precision.at_least_float32(o), size, align_corners=True)
      for o in self.offset_net(offset_in, train)
    ]

    if mask is not None and self.aggregation == "additive":
      ref = ref * mask
    warped, masks, stages = [], [], []
    t, m = ref, mask
    for o in offsets:
      grid = sampling.offsets_to_grid(o)
      t = sampling.grid_sample(t, grid)
      if m is None:
        stages.append(t)
      else:
        if self.warp_mask:
          m = sampling.grid_sample(m, grid)
        masks.append(m)
        if self.aggregation == "masked":
          stages.append(t * m + (1 - m) * bkg)
        else:
          stages.append(t + (1 - m) * bkg)
      warped.append(t)
    return dict(
      reference=ref,
      mask=mask,
      offsets=offsets,
      warped=warped,
      masks=masks,
      stages=stages,
      prediction=stages[-1],
      template=template,
      vq=vq_aux,
    )


# ---------------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Every term of the training loss; defaults are the official Ped2 code's.

  L = sum_k recon[k] MSE(x_k, x) + sum_k grad[k] G(x, x_k) + vq (codebook + beta commitment)
      + offset * (sum_k norm[k] mean||O_k|| + sum_k S_{smooth_sizes[k]}(O_k))
      + template MSE(bkg, x)
      + mask (-mean(m log m) + mask_area relu(mean(m) - mask_target))
      + template_masked sum((1 - sg(m_K)) (bkg - x)^2) / sum(1 - sg(m_K))
      + reference MSE(t_0, x).

  With ``foreground > 0`` (ShanghaiTech) the pixel MSEs, gradient losses, offset norms and
  smoothness maps are weighted means with per-pixel weights
  w = 1 + foreground * avgpool_{foreground_pool}(|x - sg(bkg)|^0.5), which stresses the moving
  foreground over the static background. Every default is 0 / off except the Ped2 terms, so the
  Ped2 and image-mode losses do not change.

  Attributes:
    recon: per-stage weight of the pixel MSE.
    grad: per-stage weight of the gradient-difference loss (Ped2 (0.25, 1); Avenue (1, 1)).
    vq: weight of the quantiser's losses.
    offset: overall deformation-regulariser weight (gamma_2).
    norm: per-head weight of the mean offset norm inside it (Ped2 0.4; Avenue 1).
    smooth_sizes: per-head kernel size of the zero-sum smoothness filter.
    smooth_kind: "1d" (Ped2) or "2d" (Avenue / ShanghaiTech).
    template: weight of MSE(bkg, x) that trains the background template.
    foreground: strength of the foreground weighting (ShanghaiTech 100; 0 = plain means).
    foreground_pool: side of the average pooling of the foreground weights (15; stride 1, zero
      padding counted in the average).
    mask: weight of the mask regulariser (ShanghaiTech 0.1, applied to the unwarped mask).
    mask_area: weight of the mask-area hinge inside it (0.1).
    mask_target: mean mask value above which the hinge acts (0.01).
    template_masked: weight of the template MSE restricted to the pixels the final warped mask
      leaves to the background (ShanghaiTech 1). As in the official code the numerator sums over
      the image channels and the denominator over the (1-channel) mask.
    deformation: the regulariser inside ``offset``: "code" (the released one above: weighted
      mean norms plus zero-sum smoothness filters) or "paper_eq8" (paper Eq. 8:
      sum_k mean ||grad O_k||_1 + mean ||O_k||_2, with ``filters.gradient_l1``; ``norm``,
      ``smooth_sizes`` and ``smooth_kind`` are then unused).
    template_distance: the template term: "mse" (the released MSE(bkg, x)) or "l2_norm"
      (supplementary Eq. 24, ||x - x_bg||: the Euclidean norm of each sample's difference,
      averaged over the batch).
    reference: weight of the MSE between the decoded reference t_0 (before any warp) and the
      target: it asks the reference itself to be the closest prototype, so that the fields only
      refine it (image mode; the released code has no such term, 0).
  """

  recon: Sequence[float] = (1.0, 1.0)
  grad: Sequence[float] = (0.25, 1.0)
  vq: float = 1.0
  offset: float = 0.25
  norm: Sequence[float] = (0.4, 0.4)
  smooth_sizes: Sequence[int] = (7, 3)
  smooth_kind: str = "1d"
  template: float = 1.0
  foreground: float = 0.0
  foreground_pool: int = 15
  mask: float = 0.0
  mask_area: float = 0.1
  mask_target: float = 0.01
  template_masked: float = 0.0
  deformation: str = "code"
  template_distance: str = "mse"
  reference: float = 0.0


DEFORMATION_TERMS = ("code", "paper_eq8")
TEMPLATE_DISTANCES = ("mse", "l2_norm")


def _safe_norm(o):
  """Per-pixel L2 norm of (..., 2) with a zero (not NaN) gradient at 0, like torch.norm."""
  sq = jnp.sum(o * o, -1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def foreground_weights(target: jax.Array, template: jax.Array, strength: float, pool: int):
  """w = 1 + strength * avgpool_pool(|x - sg(bkg)|^0.5): (B, H, W, C) loss weights that grow
  where the frame differs from its background (the ShanghaiTech loss).

  The pooling has stride 1 and zero padding pool // 2, which counts in the average (torch's
  ``avg_pool2d`` default).
  """
  if pool < 1 or pool % 2 == 0:
    raise ValueError(f"foreground_pool must be an odd positive integer, got {pool}")
  d = jnp.sqrt(jnp.abs(target - jax.lax.stop_gradient(template)))
  pad = pool // 2
  summed = jax.lax.reduce_window(
    d, 0.0, jax.lax.add, (1, pool, pool, 1), (1, 1, 1, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0))
  )
  return jax.lax.stop_gradient(1.0 + strength * summed / (pool * pool))


def _wmean(term: jax.Array, w: jax.Array | None) -> jax.Array:
  """mean(term), or sum(term * w) / sum(w) (term broadcasts over w's channels, as coded)."""
  if w is None:
    return jnp.mean(term)
  return jnp.sum(term * w) / jnp.sum(w)


def pdm_loss(
  outputs: dict[str, Any], target: jax.Array, weights: LossWeights
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss as the official code computes it.

  Args:
    outputs: ``PDM.__call__`` outputs.
    target: (B, H, W, C) frame to reconstruct / predict, in [-1, 1].
    weights: the term weights.

  Returns:
    (total loss, dict of every weighted term and a few diagnostics).
  """
  stages, offsets = outputs["stages"], outputs["offsets"]
  k = len(stages)
  for name in ("recon", "grad", "norm", "smooth_sizes"):
    if len(getattr(weights, name)) != k:
      raise ValueError(f"pdm_loss: weights.{name} needs {k} values (one per head)")
  if weights.deformation not in DEFORMATION_TERMS:
    raise ValueError(f"loss.deformation must be one of {DEFORMATION_TERMS}, got "
                     f"{weights.deformation!r}")  # fmt: skip
  if weights.template_distance not in TEMPLATE_DISTANCES:
    raise ValueError(f"loss.template_distance must be one of {TEMPLATE_DISTANCES}, got "
                     f"{weights.template_distance!r}")  # fmt: skip
  smooth = filters.smoothness_1d if weights.smooth_kind == "1d" else filters.smoothness_2d
  fw = None
  if weights.foreground:
    fw = foreground_weights(
      target, outputs["template"], weights.foreground, int(weights.foreground_pool)
    )
  fw0 = None if fw is None else fw[..., 0]
  terms = {}
  terms["recon"] = sum(
    w * _wmean((s - target) ** 2, fw) for w, s in zip(weights.recon, stages, strict=True)
  )
  terms["grad"] = sum(
    w * _wmean(filters.gradient_difference(target, s), fw)
    for w, s in zip(weights.grad, stages, strict=True)
  )
  vq = outputs["vq"]
  terms["vq"] = weights.vq * (vq.codebook_loss + vq.commitment_loss)
  norm = sum(w * _wmean(_safe_norm(o), fw0) for w, o in zip(weights.norm, offsets, strict=True))
  if fw is None:
    sm = sum(smooth(o, ks) for ks, o in zip(weights.smooth_sizes, offsets, strict=True))
  else:
    sm = sum(
      _wmean(smooth(o, ks, reduce=False), fw)
      for ks, o in zip(weights.smooth_sizes, offsets, strict=True)
    )
  if weights.deformation == "paper_eq8":
    norm = sum(_wmean(_safe_norm(o), fw0) for o in offsets)
    sm = sum(filters.gradient_l1(o) for o in offsets)
  terms["offset"] = weights.offset * (norm + sm)
  if weights.template_distance == "mse":
    terms["template"] = weights.template * jnp.mean((outputs["template"] - target) ** 2)
  else:
    diff = (outputs["template"] - target).reshape(target.shape[0], -1)
    terms["template"] = weights.template * jnp.mean(_safe_norm(diff))
  if weights.mask or weights.template_masked:
    if outputs["mask"] is None:
      raise ValueError("pdm_loss: weights.mask / template_masked need a model with a mask")
  if weights.mask:
    m = outputs["mask"]
    area = jax.nn.relu(jnp.mean(m) - weights.mask_target)
    terms["mask"] = weights.mask * (-jnp.mean(m * jnp.log(m + 1e-8)) + weights.mask_area * area)
  if weights.template_masked:
    keep = 1.0 - jax.lax.stop_gradient(outputs["masks"][-1])
    sq = (outputs["template"] - target) ** 2
    terms["template_masked"] = (
      weights.template_masked * jnp.sum(keep * sq) / jnp.maximum(jnp.sum(keep), 1e-8)
    )
  if weights.reference:
    terms["reference"] = weights.reference * jnp.mean((outputs["reference"] - target) ** 2)
  total = sum(terms.values())
  terms["perplexity"] = vq.perplexity
  terms["mse_final"] = jnp.mean((stages[-1] - target) ** 2)
  return total, terms


# ---------------------------------------------------------------------------------------------
# Test-time maps and scores.
# ---------------------------------------------------------------------------------------------
def _error_map(pred: jax.Array, target: jax.Array, distance: str) -> jax.Array:
  """(B, H, W) per-pixel error of one reconstruction (see ``anomaly_maps``)."""
  if distance == "dis":
    return jnp.mean((pred - target) ** 2, -1) + filters.gradient_difference(target, pred)[..., 0]
  if distance == "l1":
    return jnp.mean(jnp.abs(pred - target), -1)
  return jnp.mean((pred - target) ** 2, -1)


def anomaly_maps(
  outputs: dict[str, Any],
  target: jax.Array,
  distance: str = "dis",
  stage: int = -1,
  sum_stages: bool = False,
) -> dict[str, jax.Array]:
  """Per-pixel maps of the paper: Eq. 12 A_rec = Dis(x, x_K) and Eq. 13 A_df = sum_k ||O_k||.

  Args:
    outputs: ``PDM.__call__`` outputs.
    target: (B, H, W, C).
    distance: "dis" (the training distance: channel-mean squared error plus the gradient
      difference, Eq. 10), "l1" (channel-mean absolute error, the official per-frame
      reconstruction error) or "l2" (channel-mean squared error, the training loss's pixel term).
    stage: which reconstruction x_k ``rec`` compares with the target: -1 is x_K (the paper);
      0 is the coarse stage, before the finer fields could fit what the prototype lacks.
    sum_stages: ``rec`` is the sum of the maps of ``stage`` and of every later stage (with
      ``stage = 0``: of every stage, as the training loss sums the stages' errors).

  Returns:
    dict with ``rec`` and ``df``, each (B, H, W).
  """
  if distance not in ("dis", "l1", "l2"):
    raise ValueError(f"anomaly_maps: distance must be 'dis', 'l1' or 'l2', got {distance!r}")
  stages = outputs["stages"]
  first = stage % len(stages)
  last = len(stages) if sum_stages else first + 1
  rec = sum(_error_map(pred, target, distance) for pred in stages[first:last])
  df = sum(_safe_norm(o) for o in outputs["offsets"])
  return {"rec": rec, "df": df}


def image_scores(
  maps: dict[str, jax.Array],
  *,
  kernel_size: Sequence[int] = (3, 3),
  alpha: float = 1.0,
  reduce: str = "max",
) -> dict[str, jax.Array]:
  """Eq. 14: Score = max(A_rec * k) + alpha max(A_df * k), k a box kernel.

  Args:
    maps: ``anomaly_maps`` output.
    kernel_size: box kernel k (``reduce="max"`` only).
    alpha: weight of the deformation term.
    reduce: "max" (the paper: the local maximum, for small defects) or "mean" (the map mean,
      for whole-image, semantic anomalies such as another digit class).

  Returns:
    dict of (B,) scores: ``rec``, ``df`` and their fusion ``score``.
  """
  if reduce == "max":
    ks = tuple(kernel_size)
    rec = filters.box_filter_max(maps["rec"][..., None], ks)
    df = filters.box_filter_max(maps["df"][..., None], ks)
  elif reduce == "mean":
    rec = jnp.mean(maps["rec"], axis=(1, 2))
    df = jnp.mean(maps["df"], axis=(1, 2))
  else:
    raise ValueError(f"image_scores: reduce must be 'max' or 'mean', got {reduce!r}")
  return {"rec": rec, "df": df, "score": rec + alpha * df}


def frame_errors(
  outputs: dict[str, Any], target: jax.Array, recipe: str = "dmad_ped2"
) -> dict[str, jax.Array]:
  """The official per-frame errors (higher = more anomalous), one value per sample.

  Recipes:
    dmad_ped2: ``deformation`` = box-max (7x18) of |vertical coarse offset|; ``reconstruction``
      = mean |x_K - x|; ``gradient`` = box-max (16x14) of the gradient-difference map.
    dmad_shanghai: ``deformation`` = box-max (6x18) of the coarse offset norm ||O_1||;
      ``reconstruction`` = box-max (42x31, channels summed) of the squared error (x_K - x)^2.
      The third ShanghaiTech error (``object``) needs connected components and is computed on
      the host from :func:`host_maps`.
    paper: the Eq. 12-14 maps reduced with a 3x3 box max (``rec``, ``df``).

  Args:
    outputs: ``PDM.__call__`` outputs.
    target: (B, H, W, C).
    recipe: one of the above.

  Returns:
    dict name -> (B,) errors.
  """
  pred = outputs["prediction"]
  if recipe == "dmad_ped2":
    o1y = jnp.abs(outputs["offsets"][0][..., 1:2])
    return {
      "deformation": filters.box_filter_max(o1y, (7, 18)),
      "reconstruction": jnp.mean(jnp.abs(pred - target), axis=(1, 2, 3)),
      "gradient": filters.box_filter_max(filters.gradient_difference(target, pred), (16, 14)),
    }
  if recipe == "dmad_shanghai":
    return {
      "deformation": filters.box_filter_max(_safe_norm(outputs["offsets"][0]), (6, 18)),
      "reconstruction": filters.box_filter_max((pred - target) ** 2, (42, 31)),
    }
  if recipe == "paper":
    s = image_scores(anomaly_maps(outputs, target))
    return {"rec": s["rec"], "df": s["df"]}
  raise ValueError(f"frame_errors: unknown recipe {recipe!r} (dmad_ped2, dmad_shanghai, paper)")


def _mean_pool(x: jax.Array, factor: int) -> jax.Array:
  """(B, H, W, ...) -> (B, H / f, W / f, ...) block means (OpenCV's bilinear 1/2 resize)."""
  b, h, w = x.shape[:3]
  if h % factor or w % factor:
    raise ValueError(f"host_maps: image {h}x{w} is not divisible by the pooling factor {factor}")
  x = x.reshape(b, h // factor, factor, w // factor, factor, *x.shape[3:])
  return x.mean(axis=(2, 4))


def host_maps(
  outputs: dict[str, Any],
  target: jax.Array,
  recipe: str,
  *,
  pool: int = 2,
  object_threshold: float = 0.7,
) -> dict[str, jax.Array]:
  """Per-frame maps whose errors are computed on the host, in frame order
  (:class:`dmad_jax.evaluation.video.HostFrameErrors`).

  dmad_avenue (``process_avenue.py``, at 1 / ``pool`` resolution): ``diff`` =
    (max_c pool(|x - x_K|) / 2)^2, the reconstruction difference map as the official script
    reads it back (|x - x_K| * 127.5 stored as an 8-bit image, divided by 255, squared, max over
    channels; the 8-bit rounding and JPEG coding are not reproduced); ``offset`` =
    pool(O_{1,y}^2), the squared vertical coarse offset. The official script scales the offsets
    by their global maximum first; the recipe's global min-max normalisation cancels that scale.
  dmad_shanghai: ``object_mask`` = m_K > object_threshold (the final warped mask, averaged over
    its channels) and ``error`` = the channel-mean squared error (x_K - x)^2, full resolution.
  Other recipes: no maps.

  Returns:
    dict name -> (B, h, w) arrays.
  """
  pred = outputs["prediction"]
  if recipe == "dmad_avenue":
    diff = jnp.max(_mean_pool(jnp.abs(target - pred), pool), axis=-1) / 2
    return {
      "diff": diff**2,
      "offset": _mean_pool(outputs["offsets"][0][..., 1] ** 2, pool),
    }
  if recipe == "dmad_shanghai":
    if not outputs["masks"]:
      raise ValueError("host_maps: recipe dmad_shanghai needs a model with a foreground mask")
    return {
      "object_mask": jnp.mean(outputs["masks"][-1], -1) > object_threshold,
      "error": jnp.mean((pred - target) ** 2, -1),
    }
  return {}


def set_template(params: dict, image: jax.Array) -> dict:
  """Returns params with the background templates set from ``image``.

  Args:
    params: PDM parameters.
    image: one (H, W, C) template in [-1, 1], copied to every template, or a (T, H, W, C) bank
      with one row per template (trained ones first, then the frozen ones).

  Raises:
    ValueError: when the shapes do not fit the model's templates.
  """
  t = params["template"]
  frozen = params.get("template_frozen")
  total = t.shape[0] + (0 if frozen is None else frozen.shape[0])
  image = jnp.asarray(image, t.dtype)
  if image.shape == t.shape[1:]:
    out = {**params, "template": jnp.broadcast_to(image, t.shape)}
    if frozen is not None:
      out["template_frozen"] = jnp.broadcast_to(image, frozen.shape)
    return out
  if image.shape != (total, *t.shape[1:]):
    raise ValueError(
      f"set_template: template is {t.shape[1:]} and the model has {total} of them, got "
      f"{image.shape} (expected one template or a bank of {total})"
    )
  out = {**params, "template": image[: t.shape[0]]}
  if frozen is not None:
    out["template_frozen"] = image[t.shape[0] :]
  return out


# ---------------------------------------------------------------------------------------------
# Detector: what the trainer and the eval job call.
# ---------------------------------------------------------------------------------------------
SCORE_DEFAULTS = {
  "distance": "dis",
  "kernel_size": (3, 3),
  "alpha": 1.0,
  "reduce": "max",
  "stage": -1,
  "sum_stages": False,
  "prototypes": 1,
}
# Training-time augmentation (none in the released code): ``shift`` translates every training
# image (and, in video mode, its whole clip) by up to this many pixels along each axis. The
# background template does not move with it, so with a masked template (video) it blurs the
# background the model learns. On the digits it lowered validation AUROC (0.9914 -> 0.9682 with
# 2 pixels; experiments/results/digits_selection.json).
AUGMENT_DEFAULTS = {"shift": 0}


@base.register("pdm")
class PDMDetector(base.Detector):
  """Binds PDM, its loss and its scores to the batch format of ``dmad_jax.data``.

  Image mode (``t_length == 1``): the input and the target are ``batch["image"]``. Video mode:
  ``batch["frames"]`` stacks t_length frames on the channel axis, oldest first; the model sees
  the first t_length - 1 and predicts the last.

  Config: ``model`` (PDM attributes), ``loss`` (LossWeights fields), ``score`` (``distance``,
  ``stage``, ``sum_stages``: see ``anomaly_maps``; ``kernel_size``, ``alpha``, ``reduce``: see
  ``image_scores``; ``prototypes``: with ``global_code``, how many of an image's nearest codes
  are decoded and warped, the image being scored against the one that fits it best),
  ``augment`` (``shift``: random translations of the training images, ``AUGMENT_DEFAULTS``),
  ``t_length``, ``template_init`` ("zeros", "median" of ``template_median_items`` training
  images, "bank" of per-template estimates with ``template_method`` / ``template_max_frames``,
  or an image file) and ``eval.recipe`` (which official frame errors ``predict`` adds). Batches
  may carry ``template_index`` (video sources do), the background template of each sample.
  """

  config_sections = {
    "model": PDM,
    "loss": LossWeights,
    "score": SCORE_DEFAULTS,
    "augment": AUGMENT_DEFAULTS,
  }
  config_keys = (
    "t_length",
    "template_init",
    "template_median_items",
    "template_method",
    "template_max_frames",
  )
  figure_rows = ("input", "reference", "coarse", "fine")
  pixel_map = "rec"
  score_names = ("score", "rec", "df")
  float32_params = ("template", "template_frozen")  # images: kept in float32 (nn.precision)

  def __init__(self, config):
    super().__init__(config)
    self.module = PDM(**self.section("model"))
    self.weights = LossWeights(**self.section("loss"))
    score = self.section("score")
    self.kernel_size = tuple(score["kernel_size"])
    self.alpha = float(score["alpha"])
    self.reduce = score["reduce"]
    self.distance = score["distance"]
    self.stage = int(score["stage"])
    self.sum_stages = bool(score["sum_stages"])
    self.prototypes = int(score["prototypes"])
    if self.prototypes > 1 and not self.module.global_code:
      raise ValueError(
        f"config.score.prototypes = {self.prototypes} needs config.model.global_code = True "
        "(one code, hence one prototype, per image)"
      )
    if not 1 <= self.prototypes <= self.module.num_codes:
      raise ValueError(
        f"config.score.prototypes must be in [1, num_codes = {self.module.num_codes}], "
        f"got {self.prototypes}"
      )
    if not -len(self.module.head_strides) <= self.stage < len(self.module.head_strides):
      raise ValueError(
        f"config.score.stage must index one of the {len(self.module.head_strides)} "
        f"deformation stages, got {self.stage}"
      )
    self.t_length = int(config.get("t_length", 1))
    self.recipe = config.get("eval", {}).get("recipe", "none")
    self.shift = int(self.section("augment")["shift"])
    if self.shift < 0 or 2 * self.shift >= self.module.image_size:
      raise ValueError(
        f"config.augment.shift must be in [0, image_size / 2 = {self.module.image_size // 2}), "
        f"got {self.shift}"
      )

  def split(self, batch):
    """(model input, target) of a batch."""
    if self.t_length == 1:
      return batch["image"], batch["image"]
    frames = batch["frames"]
    c = self.module.out_channels
    return frames[..., :-c], frames[..., -c:]

  def init(self, rng, batch):
    """Variables ({"params", "batch_stats"}) for a batch of the training format."""
    x, _ = self.split(batch)
    return self.module.init(rng, x, train=False, template_index=batch.get("template_index"))

  def loss(self, params, batch_stats, batch, rng):
    """Training loss; returns (loss, (terms, new_batch_stats)). ``rng`` draws the shifts of
    ``augment.shift`` (unused without)."""
    x, target = self.split(batch)
    if self.shift:
      # Input and target move together (one clip, one offset).
      both = random_shifts(rng, jnp.concatenate([x, target], -1), self.shift)
      x, target = both[..., : x.shape[-1]], both[..., x.shape[-1] :]
    out, updates = self.apply(
      self.module,
      {"params": params, "batch_stats": batch_stats},
      x,
      train=True,
      template_index=batch.get("template_index"),
      mutable=["batch_stats"],
    )
    total, terms = pdm_loss(out, target, self.weights)
    return total, (terms, updates["batch_stats"])

  def predict(self, variables, batch) -> base.Prediction:
    """Scores (higher = more anomalous), maps and the pictures of the eval figure.

    Returns:
      ``scores`` {``score`` (Eq. 14 fusion), ``rec``, ``df``}, ``maps`` {``rec``, ``df``:
      (B, H, W)}, ``images`` {``input``, ``reference``, ``coarse``, ``fine``: (B, H, W, C)},
      ``frame_errors``: the official ``dmad_ped2`` frame errors as ``ped2_*`` and, with
      ``eval.recipe = "dmad_shanghai"``, its errors as ``shanghai_*``; and, for the
      ``dmad_avenue`` / ``dmad_shanghai`` recipes, ``host_maps`` (see :func:`host_maps`).
    """
    x, target = self.split(batch)

    def scored(rank):
      out = self.apply(
        self.module,
        variables,
        x,
        train=False,
        template_index=batch.get("template_index"),
        code_rank=rank,
      )
      maps = anomaly_maps(out, target, self.distance, self.stage, self.sum_stages)
      scores = image_scores(
        maps, kernel_size=self.kernel_size, alpha=self.alpha, reduce=self.reduce
      )
      # The quantiser's record (losses, usage) is not per image and is not used here.
      return {k: v for k, v in out.items() if k != "vq"}, maps, scores

    out, maps, scores = scored(None)
    if self.prototypes > 1:
      # Each image is explained by whichever of its nearest prototypes fits it best: its
      # outputs, maps and scores all come from that one (the lowest rank on a tie). A loop
      # over the ranks, compiled once, keeps the best so far (memory of one prototype).
      def keep_better(best, rank):
        new = scored(rank)
        better = new[2]["score"] < best[2]["score"]

        def pick(b, n):
          return jnp.where(better.reshape(-1, *(1,) * (n.ndim - 1)), n, b)

        return jax.tree.map(pick, best, new), None

      ranks = jnp.arange(1, self.prototypes, dtype=jnp.int32)
      (out, maps, scores), _ = jax.lax.scan(keep_better, (out, maps, scores), ranks)
    # The prefixes are those of dmad_jax.evaluation.video.ERROR_PREFIX.
    errors = {f"ped2_{k}": v for k, v in frame_errors(out, target).items()}
    if self.recipe == "dmad_shanghai":
      errors.update({f"shanghai_{k}": v for k, v in frame_errors(out, target, self.recipe).items()})
    images = {
      "input": target,
      "reference": out["reference"],
      "coarse": out["stages"][0],
      "fine": out["stages"][-1],
    }
    return base.Prediction(
      scores=scores,
      maps=maps,
      images=images,
      frame_errors=errors,
      host_maps=host_maps(out, target, self.recipe),
    )

  def data_init(self):
    """The background template's initial value from ``config.template_init`` (None: zeros)."""
    how = self.config.get("template_init", "zeros")
    if how in ("zeros", "", None):
      return None
    if how == "median":
      return base.MedianImage(int(self.config.get("template_median_items", 2000)))
    if how == "bank":
      return base.TemplateBank(
        method=self.config.get("template_method", "hist_mode"),
        max_frames=self.config.get("template_max_frames", None),
      )
    return base.ImageFile(str(how))

  def apply_data_init(self, params, value):
    return set_template(params, jnp.asarray(value)) if "template" in params else params
