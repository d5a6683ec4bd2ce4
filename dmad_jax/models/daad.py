"""DAAD / DAAD+: a UNet-like autoencoder whose encoder-to-decoder paths read block-wise memories.

Divide-and-Assemble Anomaly Detection (Hou et al., ICCV 2021; facts in shared/spec/seed_systems.md
Sec. 3; the authors released no code, so the paper is the reference):

* the encoder is ``[ConvBNReLU 3x3] x 2 + maxpool 2x2`` per level (widths 64, 128, 256, 512);
* after each pooling, level ``l`` divides its map into ``r_h x r_w x r_c`` blocks, each block
  queries that level's own bank of N items (softmax over cosine similarities, hard shrinkage at
  1/N) and the read blocks are assembled into ``m_l`` (:class:`dmad_jax.nn.BlockMemory`);
* the decoder starts from ``m_L`` and concatenates ``m_{l}`` at every scale (paper Tab. 7), so no
  path from the encoder to the decoder avoids a memory;
* DAAD+ adds a DCGAN discriminator (paper Tab. 8): adversarial and alignment losses during
  training, and the distance of its 100-d features of ``x`` and ``x_hat`` as a second score,
  fused with the reconstruction error as ``gamma R(x) + (1 - gamma) L(x)``.

The ablation rows of the paper's Table 3 are settings of the same model: AE (no skips, no
memory), MemAE (no skips, one per-pixel memory at the deepest level), AE+Skip (skips, no memory),
DAAD (skips through memories at every level) and DAAD+ (DAAD with the discriminator;
``model_name="daad_plus"``).

Choices the paper leaves open are :class:`DAAD` attributes (config ``model.*``), with the spec's
recommendation as default: re-normalisation of the shrunk weights (``renormalize=True``, MemAE),
memory initialisation (``memory_init="uniform"``, MemAE's ``U(-1/sqrt(D), 1/sqrt(D))``) and the
output activation (``output_activation="tanh"``, matching inputs in [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dmad_jax.models import base
from dmad_jax.nn import precision
from dmad_jax.nn.fast_conv import FastConv
from dmad_jax.nn.init import torch_default_bias_init, torch_default_kernel_init
from dmad_jax.nn.layers import Conv, batch_norm, max_pool2
from dmad_jax.nn.memory import BlockMemory
from dmad_jax.ops.augment import random_flips

GRANULARITIES = ("block", "pixel")
OUTPUT_ACTIVATIONS = ("tanh", "none")
SCALINGS = ("train", "none")
# What the generator sees on video clips (the paper's video experiment leaves it open): the
# frame itself, or the clip's earlier frames stacked on the channel axis with the last frame as
# the target (future-frame prediction, as MNAD and DMAD-PDM).
INPUT_MODES = ("reconstruct", "predict")
_STATS = ("r_min", "r_max", "l_min", "l_max")


# ---------------------------------------------------------------------------------------------
# Generator: the memory-augmented UNet.
# ---------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
  """conv3 (no bias: a BatchNorm follows) - BN - ReLU.

  Attributes:
    features: output channels.
  """

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(N, H, W, C) -> (N, H, W, features)."""
    return nn.relu(batch_norm(train)(Conv(self.features, 3, use_bias=False)(x)))


def _up(features: int, name: str) -> nn.ConvTranspose:
  """``torch.nn.ConvTranspose2d(k=2, s=2)``: exactly doubles H and W."""
  return nn.ConvTranspose(
    features,
    (2, 2),
    strides=(2, 2),
    padding="VALID",
    transpose_kernel=True,
    kernel_init=torch_default_kernel_init,
    bias_init=torch_default_bias_init(4 * features),  # torch's fan_in of a transposed conv
    name=name,
  )


def _per_level(value, levels: int, name: str, shared) -> list:
  """``value`` once for every level (when ``shared(value)``) or one entry per level, as a list."""
  if shared(value):
    return [value] * levels
  value = list(value)
  if len(value) != levels:
    raise ValueError(f"DAAD.{name} needs one value or {levels} (one per level), got {value}")
  return value


def _is_triple(v) -> bool:
  return len(v) == 3 and all(isinstance(r, int) for r in v)


class DAAD(nn.Module):
  """The DAAD generator (paper Tab. 7), with every ablation of Tab. 3 as a setting.

  Attributes:
    channels: encoder widths per level, shallow to deep (paper: 64, 128, 256, 512). The input
      size must be divisible by ``2 ** len(channels)``.
    bottleneck: width of the two convolutions on the deepest read (paper: 1024).
    out_channels: channels of the reconstruction.
    skips: concatenate level ``l``'s (read) features into the decoder at its scale (UNet).
    memory_levels: levels (1 = shallowest) whose encoder-to-decoder path reads a memory; the
      other paths pass the encoder features unchanged.
    rates: ``(r_h, r_w, r_c)`` division rates, shared by all levels (the paper) or one triple
      per level. Ignored along H and W with ``granularity="pixel"``.
    granularity: "block" (the rates above) or "pixel" (one query per pixel, the MemAE read of
      the paper's reimplementation; ``r_c`` still splits the channels).
    num_items: N, the items of each level's bank (one value or one per level).
    shrink: hard shrinkage of the addressing weights at 1/N (paper Sec. 3.1.2).
    renormalize: re-normalise the kept weights to sum 1 (not stated in the paper; MemAE does).
    temperature: softmax temperature of the cosine similarities (paper Eq. 1: 1).
    memory_init: "uniform" (MemAE), "normal" or "unit_positive" (MNAD); see ``BlockMemory``.
    output_activation: "tanh" (outputs in [-1, 1], like the inputs) or "none" (linear).
  """

  channels: Sequence[int] = (64, 128, 256, 512)
  bottleneck: int = 1024
  out_channels: int = 3
  skips: bool = True
  memory_levels: Sequence[int] = (1, 2, 3, 4)
  rates: Sequence[Any] = (8, 8, 1)
  granularity: str = "block"
  num_items: Any = 500
  shrink: bool = True
  renormalize: bool = True
  temperature: float = 1.0
  memory_init: str = "uniform"
  output_activation: str = "tanh"

  def _check(self, x: jax.Array) -> None:
    levels = len(self.channels)
    if x.ndim != 4:
      raise ValueError(f"DAAD: input must be (B, H, W, C), got shape {x.shape}")
    if x.shape[1] % 2**levels or x.shape[2] % 2**levels:
      raise ValueError(
        f"DAAD: input size {x.shape[1:3]} must be divisible by 2**{levels} "
        f"(one 2x2 pooling per level of channels={tuple(self.channels)})"
      )
    bad = [lv for lv in self.memory_levels if not 1 <= lv <= levels]
    if bad:
      raise ValueError(f"DAAD: memory_levels {tuple(self.memory_levels)} not in 1..{levels}")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"DAAD.granularity must be one of {GRANULARITIES}: {self.granularity!r}")
    if self.output_activation not in OUTPUT_ACTIVATIONS:
      raise ValueError(
        f"DAAD.output_activation must be one of {OUTPUT_ACTIVATIONS}: {self.output_activation!r}"
      )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
    """Reconstructs ``x``.

    Args:
      x: ``(B, H, W, C)`` images in [-1, 1].
      train: BatchNorm with batch statistics (True) or running averages.

    Returns:
      dict with ``reconstruction`` ``(B, H, W, out_channels)`` and ``weights``: {level: the
      ``(B, r_h, r_w, r_c, N)`` addressing weights of that level's memory}.
    """
    self._check(x)
    levels = len(self.channels)
    rates = _per_level(self.rates, levels, "rates", _is_triple)
    items = _per_level(self.num_items, levels, "num_items", lambda v: isinstance(v, int))
    reads, weights = [], {}
    h = x
    for i, c in enumerate(self.channels):
      h = ConvBNReLU(c, name=f"enc{i + 1}_1")(h, train)
      h = ConvBNReLU(c, name=f"enc{i + 1}_2")(h, train)
      h = max_pool2(h)
      level = i + 1
      if level in self.memory_levels:
        r_h, r_w, r_c = (int(r) for r in rates[i])
        if self.granularity == "pixel":
          r_h, r_w = h.shape[1], h.shape[2]
        read, w = BlockMemory(
          num_items=int(items[i]),
          rates=(r_h, r_w, r_c),
          shrink=self.shrink,
          renormalize=self.renormalize,
          temperature=self.temperature,
          memory_init=self.memory_init,
          name=f"memory{level}",
        )(h)
        weights[level] = w
        reads.append(read)
      else:
        reads.append(h)
      # The encoder goes on from its own features; only the decoder sees the reads.

    y = ConvBNReLU(self.bottleneck, name="dec_bottleneck_1")(reads[-1], train)
    y = ConvBNReLU(self.bottleneck, name="dec_bottleneck_2")(y, train)
    for i in reversed(range(levels)):
      y = _up(self.channels[i], name=f"up{i + 1}")(y)
      if i == 0:
        break
      if self.skips:
        y = jnp.concatenate([y, reads[i - 1]], axis=-1)
      y = ConvBNReLU(self.channels[i], name=f"dec{i}_1")(y, train)
      y = ConvBNReLU(self.channels[i], name=f"dec{i}_2")(y, train)
    y = ConvBNReLU(self.channels[0], name="head_1")(y, train)
    y = ConvBNReLU(self.channels[0], name="head_2")(y, train)
    # The output image is computed in float32 whatever the compute dtype (nn.precision).
    y = Conv(self.out_channels, 1, name="head_out")(precision.at_least_float32(y))
    if self.output_activation == "tanh":
      y = jnp.tanh(y)
    return {"reconstruction": y, "weights": weights}


# ---------------------------------------------------------------------------------------------
# DAAD+ discriminator (DCGAN).
# ---------------------------------------------------------------------------------------------
_dcgan_init = nn.initializers.normal(0.02)


class Discriminator(nn.Module):
  """The DCGAN discriminator of DAAD+ (paper supp. Tab. 8), generic in the input size.

  ``conv4x4 s2`` layers (the first without BatchNorm; widths ``features * 2**i``), each followed
  by LeakyReLU(0.2), halve the map until it is at most 4x4 (six layers, 64..2048, at 256x256);
  a conv covering the whole remaining map (4x4 at 256) gives the ``feature_dim`` = 100-d feature
  f_D; a 3x3 conv on it gives the real/fake logit (the paper's Sigmoid is applied in the loss).
  Weights are DCGAN's N(0, 0.02); convolutions followed by a BatchNorm have no bias.

  Attributes:
    features: width of the first layer.
    feature_dim: dimension of f_D.
  """

  features: int = 64
  feature_dim: int = 100

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Returns ``(logits (B,), features (B, feature_dim))`` of images ``x`` (B, H, W, C)."""
    i = 0
    while x.shape[1] > 4 or x.shape[2] > 4:
      x = FastConv(
        self.features * 2**i,
        (4, 4),
        strides=2,
        padding=1,
        use_bias=i == 0,
        kernel_init=_dcgan_init,
        name=f"conv{i + 1}",
      )(x)
      if i:
        x = batch_norm(train, name=f"bn{i + 1}")(x)
      x = nn.leaky_relu(x, 0.2)
      i += 1
    f = FastConv(
      self.feature_dim, x.shape[1:3], padding="VALID", kernel_init=_dcgan_init, name="feature"
    )(x)
    logits = FastConv(1, (3, 3), padding=1, kernel_init=_dcgan_init, name="classifier")(f)
    return logits.reshape(x.shape[0]), f.reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# Losses and scores (pure functions).
# ---------------------------------------------------------------------------------------------
def reconstruction_error(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """R(x): the per-sample mean squared pixel error (paper Eq. 4 and 7), shape (B,)."""
  return jnp.mean((x - x_hat) ** 2, axis=tuple(range(1, x.ndim)))


ALI_DISTANCES = ("mse", "l2")


def alignment_error(f: jax.Array, f_hat: jax.Array, distance: str = "mse") -> jax.Array:
  """Per-sample distance of discriminator features, (B,): L(x) of Eq. 7 and the alignment loss.

  ``distance``: "mse", the mean squared difference over the features (the default here; the
  paper writes Eq. 6 as a norm and no code was released), or "l2", Eq. 6's Euclidean norm
  ||f_D(x) - f_D(x_hat)||_2 (its gradient at 0 is taken as 0).
  """
  d2 = jnp.sum((f - f_hat) ** 2, axis=-1)
  if distance == "mse":
    return d2 / f.shape[-1]
  if distance == "l2":
    positive = d2 > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, d2, 1.0)), 0.0)
  raise ValueError(f"alignment distance must be one of {ALI_DISTANCES}, got {distance!r}")


def fused_score(rec: jax.Array, ali: jax.Array, stats: dict, gamma: float) -> jax.Array:
  """Paper Eq. 7: ``gamma R + (1 - gamma) L``, each min-max scaled with ``stats``."""
  r_s = base.min_max_scale(rec, stats["r_min"], stats["r_max"])
  l_s = base.min_max_scale(ali, stats["l_min"], stats["l_max"])
  return gamma * r_s + (1.0 - gamma) * l_s


def _bce(logits: jax.Array, target: float) -> jax.Array:
  """Mean binary cross entropy of sigmoid(logits) against a constant label."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


def _kept_fraction(weights: dict) -> dict[str, jax.Array]:
  """Diagnostics: the mean fraction of items each level's shrinkage keeps."""
  return {f"kept_items_l{lv}": jnp.mean(w > 0) for lv, w in weights.items()}


# ---------------------------------------------------------------------------------------------
# Detectors: what the trainer and the eval job call.
# ---------------------------------------------------------------------------------------------
LOSS_DEFAULTS = {"rec": 50.0, "adv": 0.5, "ali": 0.5, "ali_distance": "mse"}
AUGMENT_DEFAULTS = {"hflip": True, "vflip": True}
SCORE_DEFAULTS = {"gamma": 0.9, "scaling": "train", "ali_distance": "mse"}


@base.register("daad")
class DAADDetector(base.Detector):
  """DAAD trained with the reconstruction loss only (AE, MemAE, AE+Skip and DAAD rows).

  Variables: ``params = {"generator": ...}``, ``batch_stats = {"generator": ...}``. The training
  loss is ``loss.rec * mean (x - x_hat)^2`` on randomly flipped inputs; the image score is R(x).

  Config: ``model`` (:class:`DAAD` attributes), ``loss.rec``, ``augment`` (``hflip``,
  ``vflip``), ``variant`` (the ablation row's name, informational), ``input_mode``
  ("reconstruct": the record's ``image``, the default; "predict": on video clips, the earlier
  frames of ``frames`` stacked on the channel axis, and the last frame as the target). The
  sections of DAAD+ (``discriminator``, ``score``, ``discriminator_optimizer``) are accepted and
  unused, so that a config switches between the rows with ``model_name`` alone.
  """

  config_sections = {
    "model": DAAD,
    "loss": LOSS_DEFAULTS,
    "augment": AUGMENT_DEFAULTS,
    "discriminator": Discriminator,
    "score": SCORE_DEFAULTS,
  }
  config_keys = ("variant", "discriminator_optimizer", "input_mode", "t_length")
  figure_rows = ("input", "reconstruction")
  pixel_map = "rec"
  score_names = ("score", "rec")

  def __init__(self, config):
    super().__init__(config)
    self.generator = DAAD(**self.section("model"))
    loss = self.section("loss")
    self.w_rec, self.w_adv, self.w_ali = (float(loss[k]) for k in ("rec", "adv", "ali"))
    self.ali_distance = loss["ali_distance"]
    augment = self.section("augment")
    self.hflip = bool(augment["hflip"])
    self.vflip = bool(augment["vflip"])
    self.input_mode = config.get("input_mode", "reconstruct")
    if self.input_mode not in INPUT_MODES:
      raise base.schema.ConfigError(
        f"config.input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}"
      )

  def split(self, batch):
    """(generator input, target) of a batch: (image, image), or with ``input_mode="predict"``
    (the clip's earlier frames, its last frame)."""
    if self.input_mode == "reconstruct":
      return batch["image"], batch["image"]
    if "frames" not in batch:
      raise ValueError(
        "input_mode 'predict' needs video clips (records with 'frames'); this data source "
        f"gives {sorted(k for k in batch if not k.startswith('_'))}"
      )
    frames, c = batch["frames"], batch["image"].shape[-1]
    return frames[..., :-c], frames[..., -c:]

  def _augment(self, rng, x):
    return random_flips(rng, x, horizontal=self.hflip, vertical=self.vflip)

  def _inputs(self, rng, batch):
    """(input, target) of a training batch, flipped together."""
    x, target = self.split(batch)
    if self.input_mode == "reconstruct":
      x = self._augment(rng, x)
      return x, x
    both = self._augment(rng, jnp.concatenate([x, target], -1))
    return both[..., : x.shape[-1]], both[..., x.shape[-1] :]

  def init(self, rng, batch):
    """Variables ({"params", "batch_stats"}) for a batch of the training format."""
    x, target = self.split(batch)
    return self.compiled_init(self._init, rng, x, target)

  def _init(self, rng, x, target):
    del target
    v = self.generator.init(rng, x, train=False)
    return {"params": {"generator": v["params"]}, "batch_stats": {"generator": v["batch_stats"]}}

  def loss(self, params, batch_stats, batch, rng):
    """Training loss; returns (loss, (terms, new_batch_stats)). ``rng`` draws the flips."""
    x, target = self._inputs(rng, batch)
    out, upd = self.apply(
      self.generator,
      {"params": params["generator"], "batch_stats": batch_stats["generator"]},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    mse = jnp.mean((out["reconstruction"] - target) ** 2)
    terms = {"rec": self.w_rec * mse, "mse": mse, **_kept_fraction(out["weights"])}
    return terms["rec"], (terms, {**batch_stats, "generator": upd["batch_stats"]})

  def _reconstruct(self, variables, x):
    g_vars = {
      "params": variables["params"]["generator"],
      "batch_stats": variables["batch_stats"]["generator"],
    }
    return self.apply(self.generator, g_vars, x, train=False)["reconstruction"]

  def predict(self, variables, batch) -> base.Prediction:
    """``scores`` {``score`` = ``rec`` = R(x)}, ``maps`` {``rec``: channel-mean squared error
    (B, H, W)} and ``images`` {``input``, ``reconstruction``}: of the target frame and its
    prediction with ``input_mode="predict"``."""
    x, target = self.split(batch)
    x_hat = self._reconstruct(variables, x)
    r = reconstruction_error(target, x_hat)
    return base.Prediction(
      scores={"score": r, "rec": r},
      maps={"rec": jnp.mean((target - x_hat) ** 2, axis=-1)},
      images={"input": target, "reconstruction": x_hat},
    )


@base.register("daad_plus")
class DAADPlusDetector(base.TwoPlayer, DAADDetector):
  """DAAD+: DAAD with a DCGAN discriminator, trained adversarially in the same jitted step.

  Variables: ``params = {"generator", "discriminator"}``; ``batch_stats = {"generator",
  "discriminator", "score_stats"}``, where ``score_stats`` holds the min and max of R and L over
  the training split (:meth:`statistics`, fitted by the trainer before every checkpoint), which
  scale both scores to [0, 1] before the fusion of Eq. 7. No test data is involved.

  One step computes, with ``x`` the flipped input and ``x_hat = G(x)``:

  * discriminator loss ``adv * [BCE(D(x), 1) + BCE(D(sg(x_hat)), 0)]`` (Eq. 5 maximised by D);
  * generator loss ``rec * MSE(x, x_hat) + adv * BCE(D(x_hat), 1) + ali * d(f_D(x),
    f_D(x_hat))`` with D's parameters held fixed (the non-saturating form of Eq. 5, and Eq. 6),
    where d is ``loss.ali_distance``: "mse" (default) or "l2", Eq. 6's norm (see
    :func:`alignment_error`; ``score.ali_distance`` chooses the same for L(x) in Eq. 7);

  and :meth:`value_and_grad` returns the generator gradients of the generator loss and the
  discriminator gradients of the discriminator loss in one tree; :meth:`optimizer_groups` gives
  each player its own optimizer (simultaneous updates).

  Config, besides DAAD's: ``discriminator`` (:class:`Discriminator` attributes), ``loss.adv``,
  ``loss.ali``, ``score.gamma``, ``score.scaling`` ("train": min-max over the training split;
  "none": unscaled) and ``discriminator_optimizer`` (default: ``optimizer``).
  """

  score_names = ("score", "rec", "ali")

  def __init__(self, config):
    super().__init__(config)
    self.discriminator = Discriminator(**self.section("discriminator"))
    score = self.section("score")
    self.gamma = float(score["gamma"])
    self.scaling = score["scaling"]
    self.score_ali_distance = score["ali_distance"]
    for key, value in (("loss", self.ali_distance), ("score", self.score_ali_distance)):
      if value not in ALI_DISTANCES:
        raise base.schema.ConfigError(
          f"config.{key}.ali_distance must be one of {ALI_DISTANCES}, got {value!r}"
        )
    if self.scaling not in SCALINGS:
      raise base.schema.ConfigError(
        f"config.score.scaling must be one of {SCALINGS}, got {self.scaling!r}"
      )

  def optimizer_groups(self):
    """The generator by ``config.optimizer``, the discriminator by ``discriminator_optimizer``
    (``config.optimizer`` when the config has none)."""
    d = "discriminator_optimizer" if self.config.get("discriminator_optimizer") else "optimizer"
    return {"generator": "optimizer", "discriminator": d}

  # -- variables ---------------------------------------------------------------------------
  def _init(self, rng, x, target):
    g_rng, d_rng = jax.random.split(rng)
    v = super()._init(g_rng, x, target)
    d = self.discriminator.init(d_rng, target, train=False)
    # Identity scaling until the first statistics.
    stats = {k: jnp.asarray(s, jnp.float32) for k, s in zip(_STATS, (0, 1, 0, 1), strict=True)}
    stats["calibrated"] = jnp.zeros((), jnp.float32)
    return {
      "params": {**v["params"], "discriminator": d["params"]},
      "batch_stats": {
        **v["batch_stats"],
        "discriminator": d["batch_stats"],
        base.STATISTICS: stats,
      },
    }

  # -- training ----------------------------------------------------------------------------
  def _objective(self, params, batch_stats, batch, rng):
    """Generator loss + discriminator loss, each blind to the other's parameters.

    The gradient of the sum w.r.t. the generator is that of the generator loss (D's loss only
    sees ``sg(x_hat)``), and w.r.t. the discriminator that of D's loss (the generator loss uses
    ``sg`` of D's parameters and of ``f_D(x)``), so one backward pass gives both.
    """
    x, target = self._inputs(rng, batch)
    out, g_upd = self.apply(
      self.generator,
      {"params": params["generator"], "batch_stats": batch_stats["generator"]},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    x_hat = out["reconstruction"]
    d_vars = {"params": params["discriminator"], "batch_stats": batch_stats["discriminator"]}

    def disc(variables, images):
      return self.apply(self.discriminator, variables, images, train=True, mutable=["batch_stats"])

    (logit_real, f_real), upd = disc(d_vars, target)
    (logit_fake, _), upd = disc({**d_vars, **upd}, jax.lax.stop_gradient(x_hat))
    (logit_gen, f_gen), _ = disc(jax.lax.stop_gradient(d_vars), x_hat)

    d_loss = self.w_adv * (_bce(logit_real, 1.0) + _bce(logit_fake, 0.0))
    mse = jnp.mean((x_hat - target) ** 2)
    terms = {
      "rec": self.w_rec * mse,
      "adv": self.w_adv * _bce(logit_gen, 1.0),
      "ali": self.w_ali
      * jnp.mean(alignment_error(jax.lax.stop_gradient(f_real), f_gen, self.ali_distance)),
    }
    g_loss = terms["rec"] + terms["adv"] + terms["ali"]
    terms.update(
      generator_loss=g_loss,
      discriminator_loss=d_loss,
      mse=mse,
      d_real=jnp.mean(jax.nn.sigmoid(logit_real)),
      d_fake=jnp.mean(jax.nn.sigmoid(logit_fake)),
      **_kept_fraction(out["weights"]),
    )
    new_stats = {
      **batch_stats,
      "generator": g_upd["batch_stats"],
      "discriminator": upd["batch_stats"],
    }
    return g_loss + d_loss, (terms, new_stats)

  # -- scores ------------------------------------------------------------------------------
  def _raw_scores(self, variables, batch):
    x, target = self.split(batch)
    x_hat = self._reconstruct(variables, x)
    d_vars = {
      "params": variables["params"]["discriminator"],
      "batch_stats": variables["batch_stats"]["discriminator"],
    }
    (_, f), (_, f_hat) = (
      self.apply(self.discriminator, d_vars, target, train=False),
      self.apply(self.discriminator, d_vars, x_hat, train=False),
    )
    ali = alignment_error(f, f_hat, self.score_ali_distance)
    return x_hat, reconstruction_error(target, x_hat), ali

  def statistics(self, variables, batch):
    """R and L of every record: their extrema over the training split scale the fused score.
    With ``score.scaling == "none"``: None (nothing is fitted)."""
    if self.scaling == "none":
      return None
    _, rec, ali = self._raw_scores(variables, batch)
    return {"r_min": rec, "r_max": rec, "l_min": ali, "l_max": ali}

  @property
  def fits_statistics(self) -> bool:
    return self.scaling != "none"

  def test_selected_scores(self, scores):
    """``score_test_minmax``: Eq. 7 with R and L min-max scaled over the test split (the
    spec's reading of the paper; the default scales with the training split's ranges)."""
    mm = base.min_max_over
    return {
      "score_test_minmax": self.gamma * mm(scores["rec"]) + (1 - self.gamma) * mm(scores["ali"])
    }

  def predict(self, variables, batch) -> base.Prediction:
    """``scores`` {``score`` (Eq. 7 fusion), ``rec`` = R(x), ``ali`` = L(x)}, ``maps``
    {``rec``} and ``images`` {``input``, ``reconstruction``}."""
    _, target = self.split(batch)
    x_hat, rec, ali = self._raw_scores(variables, batch)
    stats = variables["batch_stats"][base.STATISTICS]
    if self.scaling == "none":
      stats = dict(zip(_STATS, (0.0, 1.0, 0.0, 1.0), strict=True))
    return base.Prediction(
      scores={"score": fused_score(rec, ali, stats, self.gamma), "rec": rec, "ali": ali},
      maps={"rec": jnp.mean((target - x_hat) ** 2, axis=-1)},
      images={"input": target, "reconstruction": x_hat},
    )
