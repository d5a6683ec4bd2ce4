"""What the IGD configs share: the released code's recipe (shared/spec Sec. 5) per variant
(:func:`recipe`), the widths of the small models (:func:`small`) and the test-sized run
(:func:`shrink_for_tests`)."""

from __future__ import annotations

import ml_collections

from dmad_jax.configs import common

VARIANTS = ("global", "local", "fused")
ENCODERS = ("frozen", "trainable")
# Paper Tab. 1-4: one-class mean AUC and MVTec AD detection AUC (not reproduced by dmad_jax).
PAPER_ONE_CLASS = {"mnist": 0.9912, "fashion_mnist": 0.9332, "cifar10": 0.8234}
PAPER_MVTEC_DETECTION = 0.901
# The runlocal local encoder of the distillation and of the IGD configs that load it: the output
# stays ResNet18's 512-d feature.
KD_TEST_ENCODER = dict(local_encoder=(8, 8, 8), first=8, features=512)
# config.init_from.assign of a local or fused IGD run that freezes the encoder distilled by an
# igd_kd run: its encoder's parameters and BatchNorm statistics become the frozen encoder's.
KD_ASSIGN = (
  ("params/encoder", "batch_stats/local_encoder/params"),
  ("batch_stats/encoder", "batch_stats/local_encoder/batch_stats"),
)


def _adam(weight_decay: float) -> ml_collections.ConfigDict:
  """Adam lr 1e-4, betas (0, 0.9), L2 weight decay as torch's Adam adds it, poly decay 0.9."""
  return ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=1e-4,
      b1=0.0,
      b2=0.9,
      eps=1e-8,
      weight_decay=weight_decay,
      schedule="poly",
      power=0.9,
      warmup_steps=0,
      lr_multipliers={},
      grad_clip_norm=0.0,
    )
  )


def recipe(
  variant: str = "global",
  *,
  encoder: str = "frozen",
  weights: str = "",
  image_size: int = 256,
  channels: int = 3,
  epochs: float = 256.0,
) -> ml_collections.ConfigDict:
  """The code's recipe: global batch 16 images, local batch 2 images (450 patches), fused 16
  images with the local loss on the first 2; E-step every 10 epochs; a checkpoint every 10."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown IGD variant {variant!r}; known: {', '.join(VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  common.set_compute(c)
  c.model_name = "igd"
  c.data = ml_collections.ConfigDict(
    dict(name="folder", root="", image_size=image_size, channels=channels, validate=True)
  )
  c.model = ml_collections.ConfigDict(
    dict(
      variant=variant,
      encoder=encoder,
      backbone_weights=weights,
      random_backbone=False,
      latent=128,
      features=512,
      global_decoder=(512, 256, 128, 64),
      global_critic=(128, 256, 512, 512),
      local_decoder=(256, 128, 64),
      local_critic=(128, 256, 512),
      local_encoder=(128, 256, 512),
      base=512,
      first=64,
      patch_size=32,
      patch_stride=16,
      local_images=2 if variant == "fused" else 0,
      normalize="imagenet",
    )
  )
  c.loss = ml_collections.ConfigDict(
    dict(
      ssim_weight=0.85,
      global_window=11,
      global_weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333),
      local_window=3,
      local_weights=(0.0516, 0.3295, 0.3463, 0.2726),
      data_range=4.7579,
      adv=0.1,
      acai_gamma=0.2,
      alpha_max=0.5,
      partner="flip_batch",
      kappa=1.0,
      centre_floor=0.1,
    )
  )
  c.score = ml_collections.ConfigDict(
    dict(
      recipe="official",
      patch_l1="abs",
      local_recon=0.9,
      global_recon=0.1,
      fuse_local=0.5,
      paper_xi=0.5,
    )
  )
  c.augment = ml_collections.ConfigDict(dict(hflip=True))
  c.optimizer = _adam(1e-6)
  c.critic_optimizer = _adam(0.0)
  c.batch_size = 2 if variant == "local" else 16
  c.total_epochs = float(epochs)
  c.refit_every_epochs = 10.0
  c.log_every_steps = 50
  c.checkpoint_every_epochs = 10.0
  c.keep_checkpoints = 3
  c.nonfinite = "stop"
  c.eval_at_end = False
  c.eval = common.eval_section(batch_size=8, figure_samples=6)
  return c


def small(c: ml_collections.ConfigDict, divisor: int = 8) -> ml_collections.ConfigDict:
  """Every width divided by ``divisor`` (the latent by half as much): the models that train on
  small data in minutes on a CPU. Numbers from them are labelled with the widths."""
  m = c.model
  for key in ("global_decoder", "global_critic", "local_decoder", "local_critic", "local_encoder"):
    m[key] = tuple(max(4, v // divisor) for v in m[key])
  m.base, m.first = max(4, m.base // divisor), max(4, m.first // divisor)
  m.features = max(4, m.features // divisor)
  m.latent = max(4, 2 * m.latent // divisor)
  return c


def shrink_for_tests(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``runlocal`` sizes: tiny widths, a random frozen backbone (global) or a trained one
  (local), 2 steps with an E-step after the first."""
  small(c, 32)
  if c.model.variant != "local":
    c.model.random_backbone = True
  if c.get("init_from", None):  # a distilled local encoder: its (test-sized) widths
    c.model.update(KD_TEST_ENCODER)
  elif c.model.variant == "local":
    c.model.encoder = "trainable"
  c.batch_size = 4 if c.model.variant != "local" else 2
  common.set_test_durations(c)
  common.set_duration(c, "refit_every", steps=1)
  c.eval.batch_size = 8
  c.eval.figure_samples = 2
  return c


def kd_recipe(*, weights: str = "", image_size: int = 256, channels: int = 3):
  """The local encoder's distillation (paper): Adam lr 1e-4, weight decay 1e-5 (L2), 50,000
  iterations; batches of 2 images (450 patches, the local model's batch; the paper's 64 is not
  said to be images or patches)."""
  c = recipe("local", weights=weights, image_size=image_size, channels=channels)
  c.model_name = "igd_kd"
  for key in ("loss", "score", "critic_optimizer", "refit_every_epochs"):
    del c[key]
  c.optimizer = _adam(1e-5)
  c.optimizer.b1, c.optimizer.b2, c.optimizer.schedule = 0.9, 0.999, "constant"
  del c["total_epochs"]
  common.set_duration(c, "total", steps=50_000)
  common.set_duration(c, "checkpoint_every", steps=5_000)
  c.batch_size = 2
  return c


def use_kd(c: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The local encoder frozen at the distilled one of the ``igd_kd`` run in ``workdir``."""
  c.model.encoder = "frozen"
  c.init_from = ml_collections.ConfigDict(dict(workdir=workdir, step=None, assign=KD_ASSIGN))
  return c
