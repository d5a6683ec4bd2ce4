"""IGD: the interpolated Gaussian descriptor (Chen et al., CVPR 2022; shared/spec Sec. 5).

An encoder ``f`` (a frozen backbone plus a trainable ``Linear(512 -> 128)``), a decoder ``g``
(WGAN-GP-style residual blocks) and a critic ``d`` are trained together:

* reconstruction ``l_m = 0.85 (1 - MS-SSIM(x, g(z))) + 0.15 mean|x - g(z)| / L``, with ``L`` the
  range of ImageNet-normalised pixels (4.7579);
* GSVDD ``l_h = mean(1 - exp(-||z - c||^2 / sigma))`` around a centre ``c`` and width ``sigma``
  estimated from the training split (the E-step, :meth:`IGDDetector.fit_to_data`: before
  training and every ``refit_every_epochs``, 10 in the code);
* ACAI: ``z_a = a z + (1 - a) z'`` with ``a ~ U(0, 0.5)`` and the partner ``z'`` the batch
  flipped along the batch axis (as coded; ``loss.partner = "reverse_elements"`` reverses each
  vector's elements, as the paper writes); the generator adds ``0.1 mean d(g(z_a))^2``, the
  critic minimises ``mean (d(g(z_a)) - a)^2 + mean d(x~ + 0.2 (x - x~))^2``.

Two models, as released: **global** (the whole image; frozen torchvision ResNet18 up to the
average pool, converted with ``dmad convert-weights``) and **local** (32x32 patches at stride 16,
225 per 256x256 image; a custom residual encoder, frozen after a knowledge-distillation
pre-training in the paper). ``model.variant = "fused"`` trains both in one run and fuses their
scores 0.5 / 0.5 as the code's ``inference_det`` does. Where ImageNet weights are not available,
``model.encoder = "trainable"`` trains the backbone with the generator instead of freezing it:
every number that uses it says so.

Scores (``score.recipe``): ``"official"`` (default, the code's): local = max over patches of
``0.9 recon + 0.1 gsvdd``, global = ``0.1 recon + 0.9 gsvdd``, fused = 0.5 / 0.5; the code's patch
L1 term is the SIGNED ``mean(x - x~) / L`` (``score.patch_l1 = "signed"``), here the unsigned one by
default. ``"paper"``: Eq. 11, ``0.5 l_m + 0.5 l_h``. Localisation: per-scale SSIM residuals
upsampled (nearest) and weighted, plus ``0.15 |x - x~| / L``, ReLU, patches folded back with
overlaps summed, converted to gray; fused = 0.5 local + 0.5 global.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmad_jax.models import base
from dmad_jax.models import teacher as teacher_lib
from dmad_jax.nn import init as init_lib
from dmad_jax.nn import precision, resnet
from dmad_jax.nn.layers import Conv, batch_norm
from dmad_jax.ops.augment import random_flips
from dmad_jax.ops.ssim import ms_ssim, ms_ssim_maps

# ImageNet-normalised pixels span [-2.1179, 2.6400] (spec Sec. 5).
DATA_RANGE = 4.7579
GLOBAL_MSSSIM = dict(win_size=11, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
LOCAL_MSSSIM = dict(win_size=3, weights=(0.0516, 0.3295, 0.3463, 0.2726))
GRAY = (0.2989, 0.587, 0.114)
BRANCHES = {"global": ("global",), "local": ("local",), "fused": ("global", "local")}


# ---------------------------------------------------------------------------------------------
# Layers: the WGAN-GP residual blocks.
# ---------------------------------------------------------------------------------------------
def upsample2(x: jax.Array) -> jax.Array:
  """Nearest 2x upsampling. The code tiles the channels four times and applies depth-to-space;
  all four copies of a channel are equal, so each 2x2 output block repeats one input pixel."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def mean_pool2(x: jax.Array) -> jax.Array:
  """2x2 mean pooling (the code averages the four strided sub-grids)."""
  return (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4.0


def _layer_norm(name: str | None = None) -> nn.LayerNorm:
  """``nn.LayerNorm([C, H, W])``: normalised and scaled per element of (H, W, C)."""
  return nn.LayerNorm(epsilon=1e-5, reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3), name=name)


def _linear(features: int, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, kernel_init=init_lib.torch_default_kernel_init, name=name)


class UpBlock(nn.Module):
  """Residual up block: BN-ReLU-up-conv3 (no bias)-BN-ReLU-conv3, shortcut up-conv1."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    short = Conv(self.features, 1, name="shortcut")(upsample2(x))
    h = nn.relu(batch_norm(train, "bn1")(x))
    h = Conv(self.features, 3, use_bias=False, name="conv1")(upsample2(h))
    h = nn.relu(batch_norm(train, "bn2")(h))
    return short + Conv(self.features, 3, name="conv2")(h)


class DownBlock(nn.Module):
  """Residual down block: norm-ReLU-conv3 (no bias)-norm-ReLU-conv3-meanpool, shortcut
  meanpool-conv1. ``norm``: "layer" (the critics: LayerNorm over [C, H, W]) or "batch" (the
  local encoder)."""

  features: int
  norm: str = "layer"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    def norm(name):
      return _layer_norm(name) if self.norm == "layer" else batch_norm(train, name)

    short = Conv(self.features, 1, name="shortcut")(mean_pool2(x))
    h = nn.relu(norm("norm1")(x))
    h = Conv(x.shape[-1], 3, use_bias=False, name="conv1")(h)
    h = nn.relu(norm("norm2")(h))
    return short + mean_pool2(Conv(self.features, 3, name="conv2")(h))


class Decoder(nn.Module):
  """``g``: z (B, latent) -> image (B, S, S, 3).

  Linear -> 4x4xbase; global: up-conv3 (base) then up blocks, BN-ReLU, up-conv5 -> 3 (S = 4 *
  2 ** (len(blocks) + 2)); local: up blocks, BN-ReLU, conv3 -> 3 (S = 4 * 2 ** len(blocks)).
  No output activation.
  """

  blocks: tuple[int, ...]
  base: int = 512
  kind: str = "global"
  out_channels: int = 3

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    h = _linear(4 * 4 * self.base, "fc")(z).reshape(z.shape[0], 4, 4, self.base)
    if self.kind == "global":
      h = Conv(self.base, 3, name="up_conv")(upsample2(h))
    for i, f in enumerate(self.blocks):
      h = UpBlock(f, name=f"block{i + 1}")(h, train)
    h = nn.relu(batch_norm(train, "bn_out")(h))
    # The output image is computed in float32 whatever the compute dtype (nn.precision).
    h = precision.at_least_float32(h)
    if self.kind == "global":
      return Conv(self.out_channels, 5, name="out_conv")(upsample2(h))
    return Conv(self.out_channels, 3, name="out_conv")(h)


class Critic(nn.Module):
  """``d``: image -> (B,) interpolation coefficient.

  Global: conv5 s2 (first), LayerNorm down blocks, conv3 s2, Linear -> 1. Local: conv3, down
  blocks, Linear -> 1, sigmoid (as coded).
  """

  blocks: tuple[int, ...]
  first: int = 64
  kind: str = "global"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "global":
      h = Conv(self.first, 5, strides=2, name="conv_in")(x)
    else:
      h = Conv(self.first, 3, name="conv_in")(x)
    for i, f in enumerate(self.blocks):
      h = DownBlock(f, norm="layer", name=f"block{i + 1}")(h, False)
    if self.kind == "global":
      h = Conv(self.blocks[-1], 3, strides=2, name="conv_out")(h)
    out = _linear(1, "fc")(h.reshape(h.shape[0], -1))[:, 0]
    return jax.nn.sigmoid(out) if self.kind == "local" else out


class LocalEncoder(nn.Module):
  """The local model's 32x32 encoder: conv3, BatchNorm down blocks, Linear -> ``features``."""

  blocks: tuple[int, ...] = (128, 256, 512)
  first: int = 64
  features: int = 512

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = Conv(self.first, 3, name="conv_in")(x)
    for i, f in enumerate(self.blocks):
      h = DownBlock(f, norm="batch", name=f"block{i + 1}")(h, train)
    return _linear(self.features, "fc")(h.reshape(h.shape[0], -1))


class GlobalEncoder(nn.Module):
  """The global model's backbone: a torchvision ResNet trunk, average-pooled (512-d)."""

  arch: str = "resnet18"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # It computes in the input's precision (float32 by default; float64 in numerics checks).
    trunk = resnet.ResNet(arch=self.arch, stages=resnet.STAGES, dtype=x.dtype, name="resnet")
    h = trunk(x, train)["layer4"]
    return jnp.mean(h, axis=(1, 2))


class Generator(nn.Module):
  """The trainable generator: ``proj`` (Linear(features -> latent)) and the decoder."""

  decoder: Decoder
  latent: int = 128

  def setup(self):
    self.proj = _linear(self.latent)

  def encode(self, features: jax.Array) -> jax.Array:
    return self.proj(features)

  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    return self.decoder(z, train)

  def initialize(self, features: jax.Array) -> jax.Array:
    """Touches both parts (``init(..., method=Generator.initialize)``)."""
    return self.decoder(self.encode(features), False)


# ---------------------------------------------------------------------------------------------
# Patches, scores and maps (pure functions).
# ---------------------------------------------------------------------------------------------
def extract_patches(x: jax.Array, size: int, stride: int) -> jax.Array:
  """(B, H, W, C) -> (B, n, m, size, size, C) patches at ``stride`` (``size == 2 * stride``, as
  IGD's 32 / 16), built from four shifted views of the stride grid (no gather)."""
  b, h, w, c = x.shape
  if size != 2 * stride or h % stride or w % stride:
    raise ValueError(
      f"patches of {size} at stride {stride} need size == 2 * stride and an image size "
      f"divisible by the stride; got {h}x{w}"
    )
  gh, gw = h // stride, w // stride
  blocks = x.reshape(b, gh, stride, gw, stride, c).transpose(0, 1, 3, 2, 4, 5)
  top = jnp.concatenate([blocks[:, :-1, :-1], blocks[:, :-1, 1:]], axis=4)
  bottom = jnp.concatenate([blocks[:, 1:, :-1], blocks[:, 1:, 1:]], axis=4)
  return jnp.concatenate([top, bottom], axis=3)  # (B, gh-1, gw-1, size, size, C)


def fold_patches(p: jax.Array, stride: int) -> jax.Array:
  """The inverse placement of :func:`extract_patches` with overlaps SUMMED (torch ``fold``):
  (B, n, m, 2s, 2s, C) -> (B, (n + 1) s, (m + 1) s, C)."""
  b, n, m, size, _, c = p.shape
  q = p.reshape(b, n, m, 2, stride, 2, stride, c)
  out = 0.0
  for a in (0, 1):
    for d in (0, 1):
      part = q[:, :, :, a, :, d, :, :]  # (B, n, m, s, s, C)
      out = out + jnp.pad(part, ((0, 0), (a, 1 - a), (d, 1 - d), (0, 0), (0, 0), (0, 0)))
  return out.transpose(0, 1, 3, 2, 4, 5).reshape(b, (n + 1) * stride, (m + 1) * stride, c)


def model_input(images: jax.Array, normalize: str) -> jax.Array:
  """[-1, 1] images -> the models' 3-channel input: 1-channel images repeated, ImageNet-normalised
  with ``normalize="imagenet"`` (the code's input), as they are with "none"."""
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return resnet.imagenet_normalize(images) if normalize == "imagenet" else images


def reconstruction_loss(x, x_hat, *, msssim: dict, data_range: float, l1: str = "abs"):
  """Per-image ``0.85 (1 - MS-SSIM) + 0.15 L1 / L`` (B,); ``l1 = "signed"``: the code's
  ``mean(x - x~)`` in the patch scores."""
  ms = ms_ssim(x, x_hat, data_range=data_range, **msssim)
  diff = x - x_hat
  l1_term = jnp.mean(diff if l1 == "signed" else jnp.abs(diff), axis=(1, 2, 3))
  return 0.85 * (1.0 - ms) + 0.15 * l1_term / data_range


def gsvdd(z: jax.Array, c: jax.Array, sigma: jax.Array) -> jax.Array:
  """``1 - exp(-||z - c||^2 / sigma)`` per row."""
  return 1.0 - jnp.exp(-jnp.sum((z - c) ** 2, axis=-1) / sigma)


def centre(z: np.ndarray, floor: float = 0.1) -> np.ndarray:
  """The E-step's centre: the mean of ``z`` (N, D) with entries closer to 0 than ``floor`` moved
  to ``+-floor`` by their sign (exact zeros stay)."""
  c = np.mean(np.asarray(z, np.float64), axis=0)
  small = np.abs(c) < floor
  c[small & (c < 0)] = -floor
  c[small & (c > 0)] = floor
  return c


def width(distances: np.ndarray, group: int, kappa: float = 1.0) -> float:
  """The E-step's width: the mean over consecutive groups of ``group`` rows (the training
  loader's batches) of ``max(1, kappa * mean ||z - c||^2)``."""
  d = np.asarray(distances, np.float64)
  means = [d[i : i + group].mean() for i in range(0, len(d), group)]
  return float(np.mean([max(1.0, kappa * m) for m in means]))


def anomaly_map(x, x_hat, *, msssim: dict, data_range: float) -> jax.Array:
  """Per-pixel map (B, H, W, C): the SSIM map of every scale (as IGD's localisation collects
  them: ``relu(ssim_map)``, not the CS maps of the score) turned into the residual ``1 - map``,
  upsampled (nearest), weighted by the MS-SSIM weights and scaled by 0.85, plus
  ``0.15 |x - x~| / L``, ReLU."""
  maps = ms_ssim_maps(x, x_hat, data_range=data_range, kind="ssim", **msssim)
  b, h, w, c = x.shape
  total = 0.15 * jnp.abs(x - x_hat) / data_range
  for weight, m in zip(msssim["weights"], maps, strict=True):
    up = jax.image.resize(1.0 - nn.relu(m), (b, h, w, c), method="nearest")
    total = total + 0.85 * weight * up
  return nn.relu(total)


def to_gray(m: jax.Array) -> jax.Array:
  """(B, H, W, 3) -> (B, H, W) with the code's .2989 / .587 / .114 weights (1 channel: as is)."""
  if m.shape[-1] == 1:
    return m[..., 0]
  return jnp.tensordot(m, jnp.asarray(GRAY, m.dtype), axes=([-1], [0]))


# ---------------------------------------------------------------------------------------------
# The detector.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """``config.model`` of IGD.

  Attributes:
    variant: "global", "local" or "fused".
    encoder: "frozen" (the code: a pretrained backbone, constants of the model) or "trainable"
      (trained with the generator; for data without ImageNet weights, labelled as such).
    backbone_weights: the converted torchvision ResNet18 (global, frozen).
    random_backbone: torchvision's random initialisation for a frozen backbone (tests only).
    latent: ``d_z`` (128).
    features: the local encoder's output width (512; the global ResNet18 gives 512).
    global_decoder: channels of the global decoder's up blocks (after its first up-conv).
    global_critic: channels of the global critic's down blocks.
    local_decoder, local_critic, local_encoder: the local model's block channels.
    base: the decoders' 4x4 width (512); first: the critics' / local encoder's first conv (64).
    patch_size, patch_stride: the local model's patches (32 at stride 16).
    local_images: images of each batch whose patches train the local model (0: all).
    normalize: "imagenet" (the code's input normalisation, 1-channel images repeated to 3) or
      "none" (keep [-1, 1]; then set loss.data_range = 2).
  """

  variant: str = "global"
  encoder: str = "frozen"
  backbone_weights: str = ""
  random_backbone: bool = False
  latent: int = 128
  features: int = 512
  global_decoder: tuple[int, ...] = (512, 256, 128, 64)
  global_critic: tuple[int, ...] = (128, 256, 512, 512)
  local_decoder: tuple[int, ...] = (256, 128, 64)
  local_critic: tuple[int, ...] = (128, 256, 512)
  local_encoder: tuple[int, ...] = (128, 256, 512)
  base: int = 512
  first: int = 64
  patch_size: int = 32
  patch_stride: int = 16
  local_images: int = 0
  normalize: str = "imagenet"


LOSS_DEFAULTS = {
  "ssim_weight": 0.85,
  # MS-SSIM settings (spec): global 5 scales, window 11; local 4 scales, window 3. Smaller
  # images need fewer scales (each halves the image; the window must fit the smallest).
  "global_window": GLOBAL_MSSSIM["win_size"],
  "global_weights": GLOBAL_MSSSIM["weights"],
  "local_window": LOCAL_MSSSIM["win_size"],
  "local_weights": LOCAL_MSSSIM["weights"],
  "data_range": DATA_RANGE,
  "adv": 0.1,  # lambda: the generator's critic term
  "acai_gamma": 0.2,  # zeta of the critic's regulariser
  "alpha_max": 0.5,
  "partner": "flip_batch",  # or "reverse_elements" (the paper)
  "kappa": 1.0,  # 0.5 in the paper
  "centre_floor": 0.1,
}
SCORE_DEFAULTS = {
  "recipe": "official",  # or "paper" (Eq. 11)
  "patch_l1": "abs",  # or "signed" (the code)
  "local_recon": 0.9,
  "global_recon": 0.1,
  "fuse_local": 0.5,
  "paper_xi": 0.5,
}
AUGMENT_DEFAULTS = {"hflip": True}


@base.register("igd")
class IGDDetector(base.TwoPlayer, base.Detector):
  """IGD behind the detector interface (see the module docstring).

  Variables, per branch ``b`` in ("global",), ("local",) or both: ``params[b + "_generator"]``
  (``proj`` and the decoder), ``params[b + "_critic"]``, with ``model.encoder = "trainable"``
  ``params[b + "_encoder"]``; ``batch_stats[b + "_generator"]`` (decoder BatchNorm),
  ``batch_stats[b + "_encoder"]`` (the frozen backbone's ``{"params", "batch_stats"}``, or the
  trainable one's BatchNorm statistics) and ``batch_stats[b + "_gsvdd"] = {"c", "sigma"}``.

  Config: ``model`` (:class:`ModelConfig`), ``loss``, ``score``, ``augment`` (``hflip``),
  ``optimizer`` (generator and trainable encoder) and ``critic_optimizer``; durations
  ``refit_every_*`` schedule the E-step.
  """

  config_sections = {
    "model": ModelConfig,
    "loss": LOSS_DEFAULTS,
    "score": SCORE_DEFAULTS,
    "augment": AUGMENT_DEFAULTS,
  }
  config_keys = ("critic_optimizer",)
  figure_rows = ("input", "reconstruction")
  pixel_map = "igd"
  player_terms = ("generator_loss", "critic_loss")

  def __init__(self, config):
    super().__init__(config)
    m = ModelConfig(**self.section("model"))
    if m.variant not in BRANCHES:
      raise base.schema.ConfigError(
        f"config.model.variant must be one of {tuple(BRANCHES)}, got {m.variant!r}"
      )
    if m.encoder not in ("frozen", "trainable"):
      raise base.schema.ConfigError(
        f"config.model.encoder must be 'frozen' or 'trainable', got {m.encoder!r}"
      )
    if m.normalize not in ("imagenet", "none"):
      raise base.schema.ConfigError(
        f"config.model.normalize must be 'imagenet' or 'none', got {m.normalize!r}"
      )
    self.m = m
    self.branches = BRANCHES[m.variant]
    self.loss_cfg = self.section("loss")
    if self.loss_cfg["partner"] not in ("flip_batch", "reverse_elements"):
      raise base.schema.ConfigError(
        "config.loss.partner must be 'flip_batch' (the code) or 'reverse_elements' (the "
        f"paper), got {self.loss_cfg['partner']!r}"
      )
    self.score_cfg = self.section("score")
    if self.score_cfg["recipe"] not in ("official", "paper"):
      raise base.schema.ConfigError(
        f"config.score.recipe must be 'official' or 'paper', got {self.score_cfg['recipe']!r}"
      )
    if self.score_cfg["patch_l1"] not in ("abs", "signed"):
      raise base.schema.ConfigError(
        f"config.score.patch_l1 must be 'abs' or 'signed', got {self.score_cfg['patch_l1']!r}"
      )
    self.hflip = bool(self.section("augment")["hflip"])
    self.generators = {
      "global": Generator(Decoder(m.global_decoder, m.base, "global"), m.latent),
      "local": Generator(Decoder(m.local_decoder, m.base, "local"), m.latent),
    }
    self.critics = {
      "global": Critic(m.global_critic, m.first, "global"),
      "local": Critic(m.local_critic, m.first, "local"),
    }
    self.encoders = {
      "global": GlobalEncoder("resnet18"),
      "local": LocalEncoder(m.local_encoder, m.first, m.features),
    }
    self.msssim = {
      b: dict(
        win_size=int(self.loss_cfg[f"{b}_window"]),
        weights=tuple(float(w) for w in self.loss_cfg[f"{b}_weights"]),
      )
      for b in ("global", "local")
    }
    if m.encoder == "frozen" and "global" in self.branches:
      self.backbone = teacher_lib.Teacher(
        "resnet18",
        weights=m.backbone_weights,
        random=m.random_backbone,
        owner="igd",
        stages=resnet.STAGES,
      )
    pretrained = bool(self.config.get("init_from", None))
    if m.encoder == "frozen" and "local" in self.branches and not (m.random_backbone or pretrained):
      raise base.schema.ConfigError(
        "igd: the local model's frozen encoder comes from its knowledge-distillation "
        "pre-training (model_name='igd_kd', configs/mvtec_igd_kd.py): pass its workdir "
        "(configs/mvtec_igd.py arg kd=DIR, which sets config.init_from), or set "
        "model.encoder='trainable' (trained with the generator)"
      )

  @property
  def score_names(self) -> tuple[str, ...]:
    names = ("score", "recon", "gsvdd")
    return names + (("global", "local") if len(self.branches) == 2 else ())

  def optimizer_groups(self):
    groups = {}
    for b in self.branches:
      groups[f"{b}_generator"] = "optimizer"
      groups[f"{b}_critic"] = "critic_optimizer"
      if self.m.encoder == "trainable":
        groups[f"{b}_encoder"] = "optimizer"
    return groups

  # -- inputs ------------------------------------------------------------------------------
  def _prepare(self, images: jax.Array) -> jax.Array:
    return model_input(images, self.m.normalize)

  def _inputs(self, branch: str, x: jax.Array, *, train: bool) -> jax.Array:
    """The branch's samples: whole images (global) or their patches (local), (N, s, s, 3)."""
    if branch == "global":
      return x
    if train and self.m.local_images:
      x = x[: self.m.local_images]
    p = extract_patches(x, self.m.patch_size, self.m.patch_stride)
    return p.reshape(-1, *p.shape[3:])

  # -- variables ---------------------------------------------------------------------------
  def init(self, rng, batch):
    return self.compiled_init(self._init, rng, batch["image"])

  def _check_size(self, images) -> None:
    """The decoders' output sizes are fixed by their block counts: refuse other inputs early."""
    h, w = images.shape[1:3]
    if "global" in self.branches:
      size = 4 * 2 ** (len(self.m.global_decoder) + 2)
      if (h, w) != (size, size):
        raise ValueError(
          f"igd global model: {len(self.m.global_decoder)} decoder blocks make {size}x{size} "
          f"images, but the data gives {h}x{w}: set data.image_size={size} (or change "
          "model.global_decoder)"
        )
    if "local" in self.branches:
      size = 4 * 2 ** len(self.m.local_decoder)
      if size != self.m.patch_size or h % self.m.patch_stride or w % self.m.patch_stride:
        raise ValueError(
          f"igd local model: {len(self.m.local_decoder)} decoder blocks make {size}x{size} "
          f"patches (model.patch_size={self.m.patch_size}), taken at stride "
          f"{self.m.patch_stride} from {h}x{w} images: the patch size must match and the image "
          "size be a multiple of the stride"
        )

  def _init(self, rng, images):
    self._check_size(images)
    x = self._prepare(images)
    params, stats = {}, {}
    for b, key in zip(self.branches, jax.random.split(rng, len(self.branches)), strict=True):
      k_enc, k_gen, k_crit = jax.random.split(key, 3)
      s = self._inputs(b, x, train=False)[:1]
      enc = self._encoder_variables(b, k_enc, s)
      if self.m.encoder == "trainable":
        params[f"{b}_encoder"] = enc["params"]
        stats[f"{b}_encoder"] = enc["batch_stats"]
      else:
        stats[f"{b}_encoder"] = enc
      # The global encoder is ResNet18's 512-d pool; the local one ends in Linear(-> features).
      width = resnet.stage_channels("resnet18")["layer4"] if b == "global" else self.m.features
      features = jnp.zeros((1, width), s.dtype)
      gv = self.generators[b].init(k_gen, features, method=Generator.initialize)
      params[f"{b}_generator"] = gv["params"]
      stats[f"{b}_generator"] = gv["batch_stats"]
      params[f"{b}_critic"] = self.critics[b].init(k_crit, s)["params"]
      stats[f"{b}_gsvdd"] = {
        "c": jnp.zeros((self.m.latent,), jnp.float32),
        "sigma": jnp.ones((), jnp.float32),
      }
    return {"params": params, "batch_stats": stats}

  def _encoder_variables(self, branch, rng, sample):
    if branch == "global" and self.m.encoder == "frozen":
      return self.backbone.variables(rng)
    v = self.encoders[branch].init(rng, sample, train=False)
    return {"params": v["params"], "batch_stats": v["batch_stats"]}

  # -- the encoder -------------------------------------------------------------------------
  def _features(self, branch, params, batch_stats, s, *, train: bool):
    """Backbone features (N, 512) and the new encoder statistics (trainable, train mode)."""
    enc = self.encoders[branch]
    if self.m.encoder == "frozen":
      v = jax.lax.stop_gradient(batch_stats[f"{branch}_encoder"])
      if branch == "global":
        v = {"params": {"resnet": v["params"]}, "batch_stats": {"resnet": v["batch_stats"]}}
      return self.apply(enc, v, s, train=False), batch_stats[f"{branch}_encoder"]
    v = {"params": params[f"{branch}_encoder"], "batch_stats": batch_stats[f"{branch}_encoder"]}
    if not train:
      return self.apply(enc, v, s, train=False), v["batch_stats"]
    f, upd = self.apply(enc, v, s, train=True, mutable=["batch_stats"])
    return f, upd["batch_stats"]

  def _latent(self, branch, params, batch_stats, s, *, train: bool):
    f, enc_stats = self._features(branch, params, batch_stats, s, train=train)
    gen_vars = {"params": params[f"{branch}_generator"]}
    return self.apply(self.generators[branch], gen_vars, f, method=Generator.encode), enc_stats

  # -- training ----------------------------------------------------------------------------
  def _branch_objective(self, b, params, batch_stats, x, rng):
    cfg = self.loss_cfg
    L = float(cfg["data_range"])
    s = self._inputs(b, x, train=True)
    z, enc_stats = self._latent(b, params, batch_stats, s, train=True)
    gen = self.generators[b]
    g_vars = {"params": params[f"{b}_generator"], "batch_stats": batch_stats[f"{b}_generator"]}
    x_hat, upd = self.apply(gen, g_vars, z, train=True, mutable=["batch_stats"])
    alpha = jax.random.uniform(rng, (z.shape[0], 1), z.dtype, 0.0, float(cfg["alpha_max"]))
    partner = z[::-1] if cfg["partner"] == "flip_batch" else z[:, ::-1]
    z_mix = alpha * z + (1.0 - alpha) * partner
    x_mix, upd = self.apply(gen, {**g_vars, **upd}, z_mix, train=True, mutable=["batch_stats"])

    ms = ms_ssim(x_hat, s, data_range=L, **self.msssim[b])
    w = float(cfg["ssim_weight"])
    recon = jnp.mean(w * (1.0 - ms)) + (1.0 - w) * jnp.mean(jnp.abs(x_hat - s)) / L
    g = batch_stats[f"{b}_gsvdd"]
    svdd = jnp.mean(gsvdd(z, g["c"], g["sigma"]))

    critic = self.critics[b]
    c_params = params[f"{b}_critic"]
    adv = jnp.mean(self.apply(critic, {"params": jax.lax.stop_gradient(c_params)}, x_mix) ** 2)
    g_loss = recon + svdd + float(cfg["adv"]) * adv

    x_hat_sg, x_mix_sg = jax.lax.stop_gradient(x_hat), jax.lax.stop_gradient(x_mix)
    gamma = float(cfg["acai_gamma"])
    pred_alpha = self.apply(critic, {"params": c_params}, x_mix_sg)
    blend = self.apply(critic, {"params": c_params}, x_hat_sg + gamma * (s - x_hat_sg))
    d_loss = jnp.mean((pred_alpha - alpha[:, 0]) ** 2) + jnp.mean(blend**2)

    terms = {
      f"{b}_recon": recon,
      f"{b}_ms_ssim": jnp.mean(ms),
      f"{b}_gsvdd": svdd,
      f"{b}_adv": adv,
      f"{b}_generator_loss": g_loss,
      f"{b}_critic_loss": d_loss,
    }
    new_stats = {f"{b}_generator": upd["batch_stats"], f"{b}_encoder": enc_stats}
    return g_loss, d_loss, terms, new_stats

  def _objective(self, params, batch_stats, batch, rng):
    k_flip, k_alpha = jax.random.split(rng)
    images = random_flips(k_flip, batch["image"], horizontal=self.hflip, vertical=False)
    x = self._prepare(images)
    total_g, total_d, terms, stats = 0.0, 0.0, {}, dict(batch_stats)
    for b, key in zip(self.branches, jax.random.split(k_alpha, len(self.branches)), strict=True):
      g_loss, d_loss, t, new = self._branch_objective(b, params, batch_stats, x, key)
      total_g, total_d = total_g + g_loss, total_d + d_loss
      terms.update(t)
      stats.update(new)
    terms.update(generator_loss=total_g, critic_loss=total_d)
    return total_g + total_d, (terms, stats)

  # -- the E-step --------------------------------------------------------------------------
  def _latents(self, branch):
    def fn(variables, batch):
      x = self._prepare(batch["image"])
      s = self._inputs(branch, x, train=False)
      z, _ = self._latent(branch, variables["params"], variables["batch_stats"], s, train=False)
      return {"z": z.reshape(x.shape[0], -1, z.shape[-1])}

    return fn

  def fit_to_data(self, variables, collect):
    """GSVDD's E-step for every branch: ``c`` = the mean latent over the training split (every
    patch for the local model) with entries within ``loss.centre_floor`` of 0 moved to
    ``+-floor``; ``sigma`` = the mean over batches of ``config.batch_size`` images of
    ``max(1, kappa * batch-mean ||z - c||^2)``."""
    if not hasattr(self, "_fns"):
      self._fns = {b: self._latents(b) for b in self.branches}
    out = {}
    for b in self.branches:
      z = collect(self._fns[b])["z"]  # (N, patches, latent)
      flat = z.reshape(-1, z.shape[-1])
      c = centre(flat, float(self.loss_cfg["centre_floor"]))
      d = np.sum((flat - c) ** 2, axis=-1)
      group = int(self.config.batch_size) * z.shape[1]
      sigma = width(d, group, float(self.loss_cfg["kappa"]))
      out[f"{b}_gsvdd"] = {"c": c.astype(np.float32), "sigma": np.float32(sigma)}
    return out

  # -- scores ------------------------------------------------------------------------------
  def _branch_scores(self, b, variables, x):
    params, stats = variables["params"], variables["batch_stats"]
    L = float(self.loss_cfg["data_range"])
    s = self._inputs(b, x, train=False)
    z, _ = self._latent(b, params, stats, s, train=False)
    g_vars = {"params": params[f"{b}_generator"], "batch_stats": stats[f"{b}_generator"]}
    x_hat = self.apply(self.generators[b], g_vars, z, train=False)
    g = stats[f"{b}_gsvdd"]
    svdd = gsvdd(z, g["c"], g["sigma"])
    l1 = self.score_cfg["patch_l1"] if b == "local" else "abs"
    recon = reconstruction_loss(s, x_hat, msssim=self.msssim[b], data_range=L, l1=l1)
    amap = anomaly_map(s, x_hat, msssim=self.msssim[b], data_range=L)
    n = x.shape[0]
    if b == "local":
      gh = x.shape[1] // self.m.patch_stride - 1
      gw = x.shape[2] // self.m.patch_stride - 1
      k = self.m.patch_size
      amap = fold_patches(amap.reshape(n, gh, gw, k, k, -1), self.m.patch_stride)
      x_hat = fold_patches(x_hat.reshape(n, gh, gw, k, k, -1), self.m.patch_stride)
      x_hat = x_hat / _overlaps(x.shape[1], x.shape[2], self.m.patch_stride)
      recon, svdd = recon.reshape(n, -1), svdd.reshape(n, -1)
    return recon, svdd, to_gray(amap), x_hat

  def predict(self, variables, batch) -> base.Prediction:
    """``scores`` {``score``, ``recon``, ``gsvdd`` (and ``global``, ``local`` when fused)},
    ``maps`` {``igd``: the localisation map}, ``images`` {``input``, ``reconstruction``}."""
    x = self._prepare(batch["image"])
    sc = self.score_cfg
    paper = sc["recipe"] == "paper"
    per, recons, svdds, maps, recs = {}, [], [], [], {}
    for b in self.branches:
      recon, svdd, amap, x_hat = self._branch_scores(b, variables, x)
      if b == "local":
        w = float(sc["local_recon"])
        per[b] = jnp.max(w * recon + (1.0 - w) * svdd, axis=1)
        recon, svdd = jnp.max(recon, axis=1), jnp.max(svdd, axis=1)
      else:
        w = float(sc["global_recon"])
        per[b] = w * recon + (1.0 - w) * svdd
      recons.append(recon)
      svdds.append(svdd)
      maps.append(amap)
      recs[b] = x_hat
    recon, svdd = sum(recons) / len(recons), sum(svdds) / len(svdds)
    if paper:
      xi = float(sc["paper_xi"])
      score = xi * recon + (1.0 - xi) * svdd
    elif len(self.branches) == 2:
      f = float(sc["fuse_local"])
      score = f * per["local"] + (1.0 - f) * per["global"]
    else:
      score = per[self.branches[0]]
    scores = {"score": score, "recon": recon, "gsvdd": svdd}
    if len(self.branches) == 2:
      scores.update(per)
    amap = sum(maps) / len(maps)
    shown = recs.get("global", recs.get("local"))
    return base.Prediction(
      scores=scores,
      maps={"igd": amap},
      images={
        "input": batch["image"],
        "reconstruction": _display(shown, batch["image"], self.m.normalize),
      },
    )


def _overlaps(h: int, w: int, stride: int) -> jax.Array:
  """How many patches cover each pixel, (1, H, W, 1)."""
  ones = jnp.ones((1, h // stride - 1, w // stride - 1, 2 * stride, 2 * stride, 1))
  return fold_patches(ones, stride)


def _display(x_hat: jax.Array, images: jax.Array, normalize: str) -> jax.Array:
  """A reconstruction in the model's input space back to [-1, 1] with the images' channels
  (ImageNet normalisation undone; 1-channel images: the channel mean)."""
  out = x_hat
  if normalize == "imagenet":
    mean = jnp.asarray(resnet.IMAGENET_MEAN, x_hat.dtype)
    std = jnp.asarray(resnet.IMAGENET_STD, x_hat.dtype)
    out = 2.0 * (x_hat * std + mean) - 1.0
  out = jnp.clip(out, -1.0, 1.0)
  if images.shape[-1] == 1:
    out = jnp.mean(out, axis=-1, keepdims=True)
  return out


# ---------------------------------------------------------------------------------------------
# The local encoder's knowledge-distillation pre-training.
# ---------------------------------------------------------------------------------------------
@base.register("igd_kd")
class IGDDistillation(base.Detector):
  """The paper's pre-training of IGD's local encoder (spec Sec. 5): the 32x32 encoder learns to
  output the 512-d ResNet18 feature (layer4, average-pooled: 1x1 on a 32x32 patch) of every
  patch, by the mean squared error. Its run is then named by the local (or fused) IGD config
  (``config.init_from`` with ``dmad_jax.configs.igd.KD_ASSIGN``), which freezes the encoder.

  Variables: ``params = {"encoder"}``, ``batch_stats = {"encoder", "teacher"}`` (the frozen
  ResNet18, a constant). Score: the largest patch distillation error of an image.
  Config: ``model`` (:class:`ModelConfig`: ``local_encoder``, ``first``, ``features``, patches,
  ``backbone_weights`` / ``random_backbone``), ``augment``.
  """

  config_sections = {"model": ModelConfig, "augment": AUGMENT_DEFAULTS}
  score_names = ("score",)
  figure_rows = ("input",)
  pixel_map = None

  def __init__(self, config):
    super().__init__(config)
    self.m = ModelConfig(**self.section("model"))
    self.hflip = bool(self.section("augment")["hflip"])
    self.encoder = LocalEncoder(self.m.local_encoder, self.m.first, self.m.features)
    self.teacher = teacher_lib.Teacher(
      "resnet18",
      weights=self.m.backbone_weights,
      random=self.m.random_backbone,
      owner="igd_kd",
      stages=resnet.STAGES,
    )
    self.trunk = GlobalEncoder("resnet18")
    if self.m.features != resnet.stage_channels("resnet18")["layer4"]:
      raise base.schema.ConfigError(
        f"igd_kd: model.features must be ResNet18's 512 to distil its feature, got "
        f"{self.m.features}"
      )

  def _patches(self, images):
    x = model_input(images, "imagenet")
    p = extract_patches(x, self.m.patch_size, self.m.patch_stride)
    return p.reshape(-1, *p.shape[3:])

  def init(self, rng, batch):
    return self.compiled_init(self._init, rng, batch["image"])

  def _init(self, rng, images):
    k_enc, k_teacher = jax.random.split(rng)
    v = self.encoder.init(k_enc, self._patches(images)[:1], train=False)
    return {
      "params": {"encoder": v["params"]},
      "batch_stats": {"encoder": v["batch_stats"], "teacher": self.teacher.variables(k_teacher)},
    }

  def _errors(self, params, batch_stats, patches, train: bool):
    t = jax.lax.stop_gradient(batch_stats["teacher"])
    t = {"params": {"resnet": t["params"]}, "batch_stats": {"resnet": t["batch_stats"]}}
    target = jax.lax.stop_gradient(self.apply(self.trunk, t, patches, train=False))
    v = {"params": params["encoder"], "batch_stats": batch_stats["encoder"]}
    if train:
      f, upd = self.apply(self.encoder, v, patches, train=True, mutable=["batch_stats"])
      return jnp.mean((f - target) ** 2, axis=-1), upd["batch_stats"]
    return jnp.mean(
      (self.apply(self.encoder, v, patches, train=False) - target) ** 2, axis=-1
    ), None

  def loss(self, params, batch_stats, batch, rng):
    images = random_flips(rng, batch["image"], horizontal=self.hflip, vertical=False)
    err, enc_stats = self._errors(params, batch_stats, self._patches(images), True)
    kd = jnp.mean(err)
    return kd, ({"kd": kd}, {**batch_stats, "encoder": enc_stats})

  def predict(self, variables, batch) -> base.Prediction:
    images = batch["image"]
    err, _ = self._errors(
      variables["params"], variables["batch_stats"], self._patches(images), False
    )
    return base.Prediction(
      scores={"score": jnp.max(err.reshape(images.shape[0], -1), axis=1)},
      images={"input": images},
    )
