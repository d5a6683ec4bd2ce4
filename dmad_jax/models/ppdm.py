"""DMAD-PPDM (MVTec AD) and reverse distillation (RD4AD), one model with two switches.

DMAD's industrial variant (CVPR 2023, Sec. 3.6; implementation facts in
shared/spec/seed_systems.md Sec. 2) is RD4AD with a *pre*-deformation of the input:

* an OffsetNet looks at the (ImageNet-normalised) image and predicts K forward fields O_k
  (coarse to fine) and K backward fields O_k^T, each a tanh scaled to ``max_offsets[k]`` pixels;
* the image is warped by the forward fields, ``x' = x o O_1 o ... o O_K``, and a FROZEN
  ImageNet teacher (torchvision ResNet, BatchNorm on running statistics) embeds x';
* a one-class bottleneck (OCBE) with a VQ layer on the teacher's layer3 compresses the three
  teacher stages, and the RD student decoder reconstructs them;
* the backward fields undo the warp: the cycle loss ``MSE(x' o O_K^T o ... o O_1^T, x)`` keeps
  the deformation invertible, and at test time the anomaly map of x' is back-warped onto x.

Training loss, as the official code computes it (every weight is a ``LossWeights`` field):

  L = sum_{l=1..3} mean_b [1 - cos(flatten(E_l(x'_b)), flatten(D_l(x'_b)))]   (whole C*H*W maps)
      + vq (codebook + beta commitment)
      + offset (sum_k mean ||O_k|| + norm_backward sum_k mean ||O_k^T||
                + sum over all 2K fields of S3(O))                             (S3: 3x3 zero-sum)
      + cycle MSE(x_cyc, x)

The teacher is not wrapped in a stop-gradient: the loss reaches the OffsetNet THROUGH the teacher
(as in the official code), while the teacher's own variables are never trained. They are not
parameters at all: the detector keeps them in the non-trainable ``batch_stats`` collection of the
train state (``batch_stats["teacher"] = {"params", "batch_stats"}``), so no gradient, optimizer
state or weight decay ever touches them and checkpoints carry them.

Test-time maps (``anomaly_maps``): ``rec`` = Gaussian_4(back-warp(sum_l up(1 - cos_c(E_l, D_l))))
(channel-wise cosine, bilinear align-corners upsampling, Eq. 20) and ``df`` =
Gaussian_4(sum_k ||O_k^T|| o O_{k-1}^T o ... o O_1^T) (the backward half of Eq. 21, what the
official scorer uses). Image scores are the maxima of the two maps; the fused score is
``mm(rec) + alpha mm(df)`` (Eq. 22 with the official code's min-max scaling), where ``mm`` scales
with the min and max over the TRAINING split (:meth:`PPDMDetector.calibrate`; the official code
uses the test set's, which is transductive), or with no scaling (``score.scaling = "none"``, the
paper's plain Eq. 22-23).

RD4AD is the same model with ``deform=False`` (no OffsetNet: x' = x) and ``vq=False`` (RD's
3072-channel OCBE); ``model_name="rd"`` selects it. ARD (``model_name="ard"``) is RD with an
attention block in the OCBE, a reconstruction from ARD's supplementary material (ARDDetector).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmad_jax.models import base
from dmad_jax.models import teacher as teacher_lib
from dmad_jax.models.pdm import OffsetNet, _safe_norm
from dmad_jax.models.teacher import STAGES, teacher_features
from dmad_jax.nn import attention as attention_lib
from dmad_jax.nn import resnet
from dmad_jax.nn.quantize import VectorQuantizer
from dmad_jax.nn.rd import OCBE, OCBE_BLOCKS, ResNetDecoder
from dmad_jax.ops import filters, sampling

log = logging.getLogger("dmad_jax")

# torch.nn.functional.cosine_similarity's eps.
COS_EPS = 1e-8


# ---------------------------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------------------------
class VQBottleneck(nn.Module):
  """DMAD-PPDM's OCBE with a VQ layer (the official "sp" mode).

  Each teacher stage is reduced to ``reduce_channels`` by a conv3-BN-ReLU (layer1 at 1/4,
  layer2 at 1/8, layer3 at 1/16 of the image), layer1 and layer2 are brought to layer3's size by
  stride-2 conv3-BN-ReLU blocks (two and one), and the RAW layer3 features are vector-quantised
  (K codes of the teacher's layer3 width). The concatenation [l1, l2, l3, q3] (64 * 3 + 1024 =
  1216 channels for wide_resnet50_2) goes through RD's residual stage (planes 512, stride 2),
  giving the (N, S/32, S/32, 512 * expansion) embedding the decoder expects.

  Attributes:
    arch: the teacher's arch.
    num_codes: codebook size K (200).
    vq_beta: commitment weight (0.25).
    reduce_channels: width of the reduced stages (64).
  """

  arch: str = "wide_resnet50_2"
  num_codes: int = 200
  vq_beta: float = 0.25
  reduce_channels: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: dict[str, jax.Array], train: bool = False):
    """Teacher features -> (embedding, VQ aux record)."""
    kind, _, width_per_group = resnet.check_arch(self.arch)

    def block(x, strides, name):
      x = resnet.conv(self.reduce_channels, 3, strides, name=f"{name}_conv", dtype=self.dtype)(x)
      return nn.relu(resnet.batch_norm(train, f"{name}_bn", self.dtype)(x))

    l1 = block(feats["layer1"], 1, "reduce1")
    l1 = block(block(l1, 2, "down1a"), 2, "down1b")
    l2 = block(block(feats["layer2"], 1, "reduce2"), 2, "down2")
    l3 = block(feats["layer3"], 1, "reduce3")
    z = feats["layer3"]
    q3, aux = VectorQuantizer(self.num_codes, z.shape[-1], beta=self.vq_beta, name="vq")(z)
    x = jnp.concatenate([l1, l2, l3, q3.astype(l1.dtype)], axis=-1)
    emb = resnet.ResStage(
      kind,
      512,
      OCBE_BLOCKS.get(self.arch, 3),
      strides=2,
      width_per_group=width_per_group,
      dtype=self.dtype,
      name="bn_layer",
    )(x, train)
    return emb, aux


class PPDM(nn.Module):
  """DMAD-PPDM / RD4AD without its teacher's variables (they are an argument of ``__call__``).

  Attributes:
    arch: teacher arch (resnet18, resnet34, resnet50, wide_resnet50_2); the bottleneck and the
      student decoder follow it.
    image_size: S = H = W of the input; a multiple of 32 (the embedding is at S/32).
    deform: use the OffsetNet (PPDM); False feeds the image to the teacher unchanged (RD).
    vq: the VQ bottleneck (``VQBottleneck``); False is RD's OCBE.
    num_codes: VQ codebook size.
    vq_beta: VQ commitment weight.
    reduce_channels: reduced width of each stage in the VQ bottleneck.
    offset_features: OffsetNet width.
    head_strides: strides of each forward head's convolutions, coarse first (the backward heads
      mirror them); the official 256x256 heads are (2, 2, 2, 1) -> 1/8 and (2, 1) -> 1/2.
    max_offsets: maximal displacement of each head, in pixels (8, 3).
    pe_reduction: the CoordConv block length: ``num_blocks = image_size / pe_reduction`` (4).
    attention: ARD's attention block in RD's OCBE ("none", "se", "eca", "cbam", "sspcab"; see
      ``dmad_jax.nn.rd.OCBE``); only without ``vq``.
    attention_position: where it sits in the OCBE ("fusion" or "embedding").
    dtype: computation dtype (the detector passes ``config.compute_dtype``).
  """

  arch: str = "wide_resnet50_2"
  image_size: int = 256
  deform: bool = True
  vq: bool = True
  num_codes: int = 200
  vq_beta: float = 0.25
  reduce_channels: int = 64
  offset_features: int = 64
  head_strides: Sequence[Sequence[int]] = ((2, 2, 2, 1), (2, 1))
  max_offsets: Sequence[float] = (8.0, 3.0)
  pe_reduction: int = 4
  attention: str = "none"
  attention_position: str = "fusion"
  dtype: Any = jnp.float32

  def setup(self):
    resnet.check_arch(self.arch)
    if self.vq and self.attention != "none":
      raise ValueError(
        f"PPDM: attention {self.attention!r} is ARD's block in RD's OCBE; the VQ bottleneck has "
        "none (use vq=False)"
      )
    size = self.image_size
    if size % 32:
      raise ValueError(
        f"PPDM: image_size {size} must be a multiple of 32 (the teacher's layer3 is at S/16 and "
        "the bottleneck halves it once more)"
      )
    if self.deform:
      if len(self.head_strides) != len(self.max_offsets) or not self.head_strides:
        raise ValueError(
          f"PPDM: head_strides ({len(self.head_strides)} heads) and max_offsets "
          f"({len(self.max_offsets)} values) must name the same, non-zero number of heads"
        )
      for strides in self.head_strides:
        if size % int(np.prod(strides)):
          raise ValueError(f"PPDM: head strides {tuple(strides)} do not divide image_size {size}")
      if self.pe_reduction < 1 or size % self.pe_reduction:
        raise ValueError(
          f"PPDM: pe_reduction {self.pe_reduction} must be a positive divisor of image_size {size}"
        )
      heads = tuple(tuple(s) for s in self.head_strides)
      maxes = tuple(float(m) for m in self.max_offsets)
      # Forward heads first, then the backward heads (same shapes and scales, own weights).
      self.offset_net = OffsetNet(
        self.offset_features, heads + heads, maxes + maxes, size // self.pe_reduction
      )
    if self.vq:
      self.bottleneck = VQBottleneck(
        self.arch, self.num_codes, self.vq_beta, self.reduce_channels, self.dtype
      )
    else:
      self.bottleneck = OCBE(self.arch, self.attention, self.attention_position, self.dtype)
    self.decoder = ResNetDecoder(self.arch, self.dtype)

  def __call__(self, x: jax.Array, teacher_variables: dict, *, train: bool) -> dict[str, Any]:
    """Runs the model.

    Args:
      x: (B, S, S, 3) ImageNet-normalised images.
      teacher_variables: the frozen teacher's {"params", "batch_stats"}.
      train: BatchNorm mode of the trained parts (the teacher always uses running statistics).

    Returns:
      dict: ``input`` x; ``forward`` / ``backward`` lists of K full-resolution (B, S, S, 2)
      fields (empty without ``deform``); ``warped`` x' (the teacher input); ``cycle`` x' warped
      back (x itself without ``deform``); ``teacher`` and ``student`` {stage: features}; ``vq``
      the quantiser's aux record (None without ``vq``).
    """
    size = self.image_size
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
      raise ValueError(f"PPDM: expected (B, {size}, {size}, 3) images, got shape {x.shape}")
    forward, backward, warped, cycle = [], [], x, x
    if self.deform:
      fields = [
        sampling.resize_bilinear(o, size, align_corners=True) for o in self.offset_net(x, train)
      ]
      k = len(self.head_strides)
      forward, backward = fields[:k], fields[k:]
      warped = apply_fields(x, forward)
      cycle = apply_fields(warped, backward[::-1])
    feats = teacher_features(self.arch, teacher_variables, warped, self.dtype)
    vq_aux = None
    if self.vq:
      emb, vq_aux = self.bottleneck(feats, train)
    else:
      emb = self.bottleneck(feats, train)
    student = self.decoder(emb, train)
    return dict(
      input=x,
      forward=forward,
      backward=backward,
      warped=warped,
      cycle=cycle,
      teacher=feats,
      student=student,
      vq=vq_aux,
    )


# ---------------------------------------------------------------------------------------------
# Pure functions: warps, losses, maps.
# ---------------------------------------------------------------------------------------------
def apply_fields(x: jax.Array, fields: Sequence[jax.Array]) -> jax.Array:
  """``x o f_1 o f_2 ...``: warps ``x`` by each field in turn (clamped grid, bilinear,
  align_corners=True, each warp sampling the previous result)."""
  for f in fields:
    x = sampling.warp(x, f)
  return x


def back_warp(m: jax.Array, backward: Sequence[jax.Array]) -> jax.Array:
  """Eq. 20: ``m o O_K^T o ... o O_1^T`` for (B, H, W) or (B, H, W, C) maps."""
  squeeze = m.ndim == 3
  out = apply_fields(m[..., None] if squeeze else m, list(backward)[::-1])
  return out[..., 0] if squeeze else out


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1) -> jax.Array:
  """``torch.nn.functional.cosine_similarity``: each vector divided by max(||v||, 1e-8).

  The norms are computed as sqrt(max(sum v^2, eps^2)), which has the same value and a finite
  gradient at v = 0.
  """
  eps2 = COS_EPS * COS_EPS
  na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=axis, keepdims=True), eps2))
  nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=axis, keepdims=True), eps2))
  return jnp.sum((a / na) * (b / nb), axis=axis)


def distillation_loss(
  teacher: dict[str, jax.Array], student: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """RD4AD's ``loss_fucntion``: sum over stages of mean_b(1 - cos(flatten(E_b), flatten(D_b))).

  Each sample's whole (H, W, C) map is one vector (not a per-pixel cosine). The flattening order
  differs from torch's (C, H, W), but the same permutation of both vectors leaves the cosine
  unchanged.

  Returns:
    (total, {"distill_<stage>": per-stage term}).
  """
  terms = {}
  for stage in STAGES:
    t, s = teacher[stage], student[stage]
    b = t.shape[0]
    cos = cosine_similarity(t.reshape(b, -1), s.reshape(b, -1).astype(t.dtype))
    terms[f"distill_{stage}"] = jnp.mean(1.0 - cos)
  return sum(terms.values()), terms


def cycle_loss(x: jax.Array, forward: Sequence[jax.Array], backward: Sequence[jax.Array]):
  """Eq. 17 as coded: ``MSE(x o O_1 o ... o O_K o O_K^T o ... o O_1^T, x)``."""
  x_cyc = apply_fields(apply_fields(x, forward), list(backward)[::-1])
  return jnp.mean((x_cyc - x) ** 2)


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the PPDM training loss; the defaults are the official code's (gamma = 1 each).

  Attributes:
    distill: the flattened-cosine distillation loss.
    vq: the VQ layer's codebook + beta * commitment loss (gamma_1).
    offset: the deformation regulariser (gamma_2): forward-field norms and all smoothness terms.
    norm_backward: extra weight of the backward-field norms inside it; 0 in the official code,
      1 gives the paper's Eq. 18.
    smooth_size: side of the 2-D zero-sum smoothness kernel (3).
    smooth_kind: "filter" (the released zero-sum kernel above) or "gradient_l1" (paper Eq. 18's
      ||grad O||_1, ``filters.gradient_l1``), on every forward and backward field.
    cycle: the cycle-consistency MSE (gamma_3).
    attention: weight of the losses the attention block records (SSPCAB's reconstruction MSE;
      0.1 as in the SSPCAB paper); no other block records one.
  """

  distill: float = 1.0
  vq: float = 1.0
  offset: float = 1.0
  norm_backward: float = 0.0
  smooth_size: int = 3
  smooth_kind: str = "filter"
  cycle: float = 1.0
  attention: float = 0.1


def ppdm_loss(
  outputs: dict[str, Any], weights: LossWeights, recorded: dict | None = None
) -> tuple[jax.Array, dict]:
  """The training loss (module docstring) of ``PPDM.__call__`` outputs.

  Args:
    outputs: ``PPDM.__call__``'s dict.
    weights: the loss weights.
    recorded: the "losses" collection the model sowed (ARD's SSPCAB block), or None.

  Returns:
    (total, dict of the weighted terms and diagnostics).
  """
  distill, terms = distillation_loss(outputs["teacher"], outputs["student"])
  terms = {"distill": weights.distill * distill, **terms}
  sown = jax.tree.leaves(recorded or {})
  if sown:
    terms["attention"] = weights.attention * sum(sown)
  if outputs["vq"] is not None:
    vq = outputs["vq"]
    terms["vq"] = weights.vq * (vq.codebook_loss + vq.commitment_loss)
  fwd, bwd = outputs["forward"], outputs["backward"]
  if fwd:
    norm = sum(jnp.mean(_safe_norm(o)) for o in fwd)
    norm += weights.norm_backward * sum(jnp.mean(_safe_norm(o)) for o in bwd)
    if weights.smooth_kind == "filter":
      smooth = sum(filters.smoothness_2d(o, weights.smooth_size) for o in (*fwd, *bwd))
    elif weights.smooth_kind == "gradient_l1":
      smooth = sum(filters.gradient_l1(o) for o in (*fwd, *bwd))
    else:
      raise ValueError(
        f"loss.smooth_kind must be 'filter' or 'gradient_l1', got {weights.smooth_kind!r}"
      )
    terms["offset"] = weights.offset * (norm + smooth)
    terms["cycle"] = weights.cycle * jnp.mean((outputs["cycle"] - outputs["input"]) ** 2)
  total = sum(v for k, v in terms.items() if not k.startswith("distill_"))
  if outputs["vq"] is not None:
    terms["perplexity"] = outputs["vq"].perplexity
  if fwd:
    terms["offset_px"] = jnp.mean(_safe_norm(fwd[0])) * (outputs["input"].shape[1] - 1) / 2
  return total, terms


def cosine_map(teacher: dict[str, jax.Array], student: dict[str, jax.Array], size: int):
  """RD's ``cal_anomaly_map`` ("add" mode): sum over stages of the per-pixel 1 - cos over
  channels, each upsampled to ``size`` (bilinear, align_corners=True). Returns (B, S, S)."""
  total = 0.0
  for stage in STAGES:
    m = 1.0 - cosine_similarity(teacher[stage], student[stage].astype(teacher[stage].dtype))
    total = total + sampling.resize_bilinear(m[..., None], size, align_corners=True)[..., 0]
  return total


def deformation_map(backward: Sequence[jax.Array]) -> jax.Array:
  """The backward half of Eq. 21: sum_k ||O_k^T|| o O_{k-1}^T o ... o O_1^T, (B, H, W).

  For K = 2 this is the official ``warp(|O_2^T|, g_1^T) + |O_1^T|``.
  """
  total = 0.0
  for k, field in enumerate(backward):
    n = _safe_norm(field)[..., None]
    n = apply_fields(n, list(backward[:k])[::-1])
    total = total + n[..., 0]
  return total


def forward_deformation_map(forward: Sequence[jax.Array]) -> jax.Array:
  """The forward half of Eq. 21: sum_k ||O_k|| o O_{k+1} o ... o O_K, (B, H, W).

  For K = 2 this is the official ``os1 = warp(|O_1|, g_2) + |O_2|`` (computed, unused there).
  """
  total = 0.0
  for k, field in enumerate(forward):
    n = apply_fields(_safe_norm(field)[..., None], list(forward[k + 1 :]))
    total = total + n[..., 0]
  return total


def anomaly_maps(
  outputs: dict[str, Any], sigma: float = 4.0, forward_df: bool = False
) -> dict[str, jax.Array]:
  """Test-time maps of ``PPDM.__call__`` outputs, each Gaussian-smoothed (scipy's
  ``gaussian_filter``, reflect mode, truncate 4).

  Args:
    outputs: ``PPDM.__call__``'s dict.
    sigma: the Gaussian's standard deviation.
    forward_df: add the forward half of Eq. 21 (:func:`forward_deformation_map`) to the
      deformation map, as the paper's equation does; the released scorer uses the backward half
      only (the default).

  Returns:
    {"rec": the back-warped cosine map (B, S, S)} plus, with deformation, {"df": the
    deformation map (B, S, S)}.
  """
  size = outputs["input"].shape[1]
  rec = back_warp(cosine_map(outputs["teacher"], outputs["student"], size), outputs["backward"])
  maps = {"rec": filters.gaussian_blur(rec, sigma)}
  if outputs["backward"]:
    df = deformation_map(outputs["backward"])
    if forward_df:
      df = df + forward_deformation_map(outputs["forward"])
    maps["df"] = filters.gaussian_blur(df, sigma)
  return maps


# Calibration statistics in batch_stats["score_stats"]: image-level (max of each map) and
# pixel-level ranges of "rec" and "df" over the training split.
_STATS = ("rec_min", "rec_max", "df_min", "df_max", "map_rec_min", "map_rec_max")
_STATS += ("map_df_min", "map_df_max")
SCALINGS = ("train", "none")


def _identity_stats() -> dict[str, jax.Array]:
  stats = {k: jnp.asarray(0.0 if k.endswith("_min") else 1.0, jnp.float32) for k in _STATS}
  stats["calibrated"] = jnp.zeros((), jnp.float32)
  return stats


def fuse(maps: dict[str, jax.Array], stats: dict, alpha: float) -> dict[str, dict]:
  """Image scores and the fused pixel map (Eq. 22-23), each term scaled with ``stats``.

  Returns:
    {"scores": {"rec", "df", "score"} (B,), "maps": {"rec", "df", "fused"} (B, H, W)}; without
    a "df" map the score and the fused map are the "rec" ones.
  """
  rec_img = jnp.max(maps["rec"], axis=(1, 2))
  if "df" not in maps:
    return {"scores": {"rec": rec_img, "score": rec_img}, "maps": {"rec": maps["rec"]}}
  df_img = jnp.max(maps["df"], axis=(1, 2))
  mm = base.min_max_scale
  score = mm(rec_img, stats["rec_min"], stats["rec_max"])
  score = score + alpha * mm(df_img, stats["df_min"], stats["df_max"])
  fused = mm(maps["rec"], stats["map_rec_min"], stats["map_rec_max"])
  fused = fused + alpha * mm(maps["df"], stats["map_df_min"], stats["map_df_max"])
  return {
    "scores": {"rec": rec_img, "df": df_img, "score": score},
    "maps": {**maps, "fused": fused},
  }


# ---------------------------------------------------------------------------------------------
# Detectors: what the trainer and the eval job call.
# ---------------------------------------------------------------------------------------------
SCORE_DEFAULTS = {
  "alpha": 0.05,
  "sigma": 4.0,
  "scaling": "train",
  "pixel_map": None,
  "forward_df": False,
}
# Keys of config.model that choose the teacher rather than build the PPDM module.
TEACHER_KEYS = ("backbone_weights", "random_teacher")


@base.register("ppdm")
class PPDMDetector(base.Detector):
  """Binds PPDM / RD, the frozen teacher, the loss and the scores to ``dmad_jax.data`` batches.

  Variables: ``params`` = the trained parts (``offset_net``, ``bottleneck``, ``decoder``);
  ``batch_stats`` = {``model``: their BatchNorm statistics, ``teacher``: the frozen teacher's
  {"params", "batch_stats"}, ``score_stats``: the training-split score ranges}. The teacher
  lives outside ``params``, so the optimizer never sees it.

  Batches: ``batch["image"]`` (B, S, S, 3 or 1) in [-1, 1] (1 channel is repeated), mapped to
  torchvision's ImageNet normalisation (``resnet.imagenet_normalize``) before anything else.

  Config: ``model`` (:class:`PPDM` attributes plus ``backbone_weights``, the converted teacher
  file, and ``random_teacher``, True to use torchvision's random init instead: tests only),
  ``loss`` (:class:`LossWeights`), ``score`` (``alpha`` 0.05, ``sigma`` 4, ``scaling`` "train" |
  "none", ``pixel_map`` "fused" | "rec" | "df", ``forward_df``: Eq. 21's forward term in the
  deformation map, off as released).
  """

  config_sections = {"model": PPDM, "loss": LossWeights, "score": SCORE_DEFAULTS}
  # Model switches a subclass fixes (RD: no deformation, no VQ, no attention), and what to use
  # for the switch instead.
  fixed_model: dict[str, Any] = {}
  fixed_hint = ""

  def __init__(self, config):
    super().__init__(config)
    model = self.section("model", extra=TEACHER_KEYS)
    for key, value in self.fixed_model.items():
      if model.get(key, value) != value:
        raise base.schema.ConfigError(
          f"model_name {self.name!r} is PPDM with {key}={value!r}, but config.model.{key} is "
          f"{model[key]!r}; {self.fixed_hint}"
        )
      model[key] = value
    self.teacher = teacher_lib.Teacher(
      arch=model.get("arch", PPDM.arch),
      weights=str(model.pop("backbone_weights", "") or ""),
      random=bool(model.pop("random_teacher", False)),
      owner=self.name,
    )
    if "dtype" in model:
      raise base.schema.ConfigError(
        "config.model.dtype is set by config.compute_dtype ('float32' or 'bfloat16'); remove it"
      )
    self.module = PPDM(**model, dtype=self.compute_dtype)
    self.arch = self.module.arch
    self.deform = bool(self.module.deform)
    self.weights = LossWeights(**self.section("loss"))
    score = self.section("score")
    self.alpha, self.sigma = float(score["alpha"]), float(score["sigma"])
    self.forward_df = bool(score["forward_df"])
    self.scaling = score["scaling"]
    self.pixel_map = score["pixel_map"] or ("fused" if self.deform else "rec")
    if self.scaling not in SCALINGS:
      raise base.schema.ConfigError(
        f"config.score.scaling must be one of {SCALINGS}, got {self.scaling!r}"
      )
    known = ("rec", "df", "fused") if self.deform else ("rec",)
    if self.pixel_map not in known:
      raise base.schema.ConfigError(
        f"config.score.pixel_map {self.pixel_map!r} is not a map of this model (one of {known})"
      )
    self.figure_rows = ("input", "warped", "cycle") if self.deform else ("input",)

  @property
  def score_names(self):
    return ("score", "rec", "df") if self.deform else ("score", "rec")

  @property
  def reported_best_of(self):
    """The released test reports max(AUROC(fused with test-set ranges), AUROC(rec))."""
    return ("score_test_minmax", "rec") if self.deform else ()

  def test_selected_scores(self, scores):
    """``score_test_minmax``: Eq. 22 with the min-max ranges of ``rec`` and ``df`` taken over
    the test split, as the released test script does (the default scales with the training
    split's ranges)."""
    if not self.deform:
      return {}
    mm = base.min_max_over
    return {"score_test_minmax": mm(scores["rec"]) + self.alpha * mm(scores["df"])}

  # -- variables ---------------------------------------------------------------------------
  def prepare(self, images: jax.Array) -> jax.Array:
    """[-1, 1] images (3 or 1 channels) -> ImageNet-normalised 3-channel float32 images."""
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    return resnet.imagenet_normalize(x)

  def init(self, rng, batch):
    """Variables ({"params", "batch_stats"}) for a batch of the training format."""
    t_rng, s_rng = jax.random.split(rng)
    teacher = self.teacher.variables(t_rng)
    x = self.prepare(batch["image"])
    v = self.module.init(s_rng, x, teacher, train=False)
    return {
      "params": v["params"],
      "batch_stats": {
        "model": v.get("batch_stats", {}),
        "teacher": teacher,
        base.STATISTICS: _identity_stats(),
      },
    }

  def _model_variables(self, variables):
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]["model"]}

  # -- training ----------------------------------------------------------------------------
  def loss(self, params, batch_stats, batch, rng):
    """Training loss; returns (loss, (terms, new_batch_stats)). ``rng`` is unused.

    Only the trained parts' BatchNorm statistics change; the teacher entry is passed through.
    """
    del rng
    x = self.prepare(batch["image"])
    out, upd = self.apply(
      self.module,
      {"params": params, "batch_stats": batch_stats["model"]},
      x,
      batch_stats["teacher"],
      train=True,
      mutable=["batch_stats", "losses"],
    )
    total, terms = ppdm_loss(out, self.weights, upd.get("losses"))
    return total, (terms, {**batch_stats, "model": upd.get("batch_stats", {})})

  # -- scores ------------------------------------------------------------------------------
  def outputs(self, variables, images):
    """``PPDM.__call__`` outputs for [-1, 1] images (eval-mode BatchNorm)."""
    return self.apply(
      self.module,
      self._model_variables(variables),
      self.prepare(images),
      variables["batch_stats"]["teacher"],
      train=False,
    )

  @property
  def fits_statistics(self) -> bool:
    return self.deform and self.scaling != "none"

  def statistics(self, variables, batch):
    """Per image: the maxima of the "rec" and "df" maps (their extrema over the training split
    scale the fused score) and the minima of the maps (the low end of the fused map's pixel
    scale; its high end is the largest image maximum). Without deformation or with
    ``score.scaling="none"``: None."""
    if not self.fits_statistics:
      return None
    maps = anomaly_maps(self.outputs(variables, batch["image"]), self.sigma, self.forward_df)
    rows = {}
    for key in ("rec", "df"):
      top = jnp.max(maps[key], axis=(1, 2))
      rows.update(
        {
          f"{key}_min": top,
          f"{key}_max": top,
          f"map_{key}_min": jnp.min(maps[key], axis=(1, 2)),
          f"map_{key}_max": top,
        }
      )
    return rows

  def predict(self, variables, batch) -> base.Prediction:
    """Scores (higher = more anomalous), maps and the pictures of the eval figure.

    Returns:
      ``scores`` {``score`` (fused, Eq. 22), ``rec`` (max of the cosine map) and, with
      deformation, ``df`` (max of the deformation map)}, ``maps`` {``rec``, and ``df``,
      ``fused`` (Eq. 23) with deformation: (B, S, S)} and ``images`` {``input`` and, with
      deformation, ``warped`` (the teacher's input), ``cycle`` (warped back)} in [-1, 1].
    """
    out = self.outputs(variables, batch["image"])
    stats = variables["batch_stats"][base.STATISTICS]
    if self.scaling == "none":
      stats = _identity_stats()
    fused = fuse(anomaly_maps(out, self.sigma, self.forward_df), stats, self.alpha)
    images = {"input": _display(out["input"])}
    if self.deform:
      images.update(warped=_display(out["warped"]), cycle=_display(out["cycle"]))
    return base.Prediction(scores=fused["scores"], maps=fused["maps"], images=images)


@base.register("rd")
class RDDetector(PPDMDetector):
  """Reverse distillation (RD4AD): PPDM without the deformation and with RD's OCBE (no VQ)."""

  fixed_model = {"deform": False, "vq": False, "attention": "none"}
  fixed_hint = "use model_name='ppdm' for the deformation or the VQ bottleneck, 'ard' for attention"


@base.register("ard")
class ARDDetector(PPDMDetector):
  """ARD: RD with an attention block in its one-class bottleneck embedding.

  A RECONSTRUCTION: ARD's code was never published and only its supplementary material is known
  (shared/spec Sec. 4); its references point to SE, ECA, CBAM and SSPCAB, so
  ``config.model.attention`` selects one of them and ``config.model.attention_position`` where
  it sits in the OCBE (``dmad_jax.nn.rd.OCBE``). The teacher, decoder, loss and scores are RD's;
  SSPCAB adds its reconstruction MSE times ``config.loss.attention``.
  """

  fixed_model = {"deform": False, "vq": False}
  fixed_hint = "ARD is RD (no deformation, no VQ) plus attention; use model_name='ppdm' for those"

  def __init__(self, config):
    super().__init__(config)
    if self.module.attention == "none":
      raise base.schema.ConfigError(
        "model_name 'ard' needs config.model.attention (one of "
        f"{', '.join(attention_lib.ATTENTIONS)}); model_name='rd' is RD without attention"
      )


def _display(x: jax.Array) -> jax.Array:
  """ImageNet-normalised images back to [-1, 1] (for figures)."""
  mean = jnp.asarray(resnet.IMAGENET_MEAN, x.dtype)
  std = jnp.asarray(resnet.IMAGENET_STD, x.dtype)
  return jnp.clip((x * std + mean) * 2.0 - 1.0, -1.0, 1.0)
