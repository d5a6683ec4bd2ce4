"""What the DAAD configs share: the paper's MVTec recipe (:func:`paper_config`), the rows of
its ablation (:data:`VARIANTS`, :func:`apply_variant`) and the test-sized run
(:func:`shrink_for_tests`).

Every choice the paper leaves open is a named key (``model.renormalize``, ``model.memory_init``,
``model.output_activation``, ``model.temperature``, ``score.scaling``), defaulting to the
recommendation of shared/spec/seed_systems.md Sec. 3.
"""

from __future__ import annotations

import ml_collections

from dmad_jax.configs import common

# The rows of the paper's Table 3, as (model_name, model overrides). "all" = every level.
VARIANTS = {
  # Vanilla AE: no skips, no memory (down-sampling 2**levels).
  "ae": ("daad", dict(skips=False, memory_levels=(), granularity="block")),
  # MemAE as the paper re-implements it: one per-pixel memory at the deepest level, no skips.
  "memae": ("daad", dict(skips=False, memory_levels="deepest", granularity="pixel")),
  # AE+Skip: UNet skips, no memory.
  "ae_skip": ("daad", dict(skips=True, memory_levels=(), granularity="block")),
  # DAAD: every encoder-to-decoder path reads its own block-wise memory.
  "daad": ("daad", dict(skips=True, memory_levels="all", granularity="block")),
  # DAAD+: DAAD with the adversarially learned representation and the fused score.
  "daad_plus": ("daad_plus", dict(skips=True, memory_levels="all", granularity="block")),
}
# Paper Sec. 4.1: Adam lr 1e-4 with the reconstruction loss only, 2e-4 for DAAD+.
PAPER_LR = {"daad": 1e-4, "daad_plus": 2e-4}


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Sets ``model_name``, the model's skip / memory switches and the paper's learning rate."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown DAAD variant {variant!r}; known: {', '.join(VARIANTS)}")
  model_name, overrides = VARIANTS[variant]
  levels = len(c.model.channels)
  c.variant = variant
  c.model_name = model_name
  for key, value in overrides.items():
    if value == "all":
      value = tuple(range(1, levels + 1))
    elif value == "deepest":
      value = (levels,)
    setattr(c.model, key, value)
  c.optimizer.lr = PAPER_LR[model_name]
  c.discriminator_optimizer.lr = PAPER_LR[model_name]
  return c


def _adam(lr: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=lr,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      schedule="constant",
      warmup_steps=0,
      lr_multipliers={},
      grad_clip_norm=0.0,
    )
  )


def paper_config(image_size: int = 256, channels: int = 3) -> ml_collections.ConfigDict:
  """The paper's MVTec AD recipe for DAAD (apply a variant on top)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  common.set_compute(c)
  c.variant = "daad"
  c.model_name = "daad"
  c.data = ml_collections.ConfigDict(
    dict(name="folder", root="", image_size=image_size, channels=channels, validate=True)
  )
  c.model = ml_collections.ConfigDict(
    dict(
      channels=(64, 128, 256, 512),
      bottleneck=1024,
      out_channels=channels,
      skips=True,
      memory_levels=(1, 2, 3, 4),
      rates=(8, 8, 1),  # r_h, r_w, r_c, the same at every level
      granularity="block",
      num_items=500,  # N per level
      shrink=True,  # drop weights below 1/N (Sec. 3.1.2)
      # Open in the paper; spec defaults: MemAE's L1 re-normalisation of the kept weights, its
      # U(-1/sqrt(D), 1/sqrt(D)) memory, a tanh output for inputs in [-1, 1], Eq. 1's
      # temperature 1.
      renormalize=True,
      memory_init="uniform",
      output_activation="tanh",
      temperature=1.0,
    )
  )
  c.discriminator = ml_collections.ConfigDict(dict(features=64, feature_dim=100))
  # ali_distance: "mse" (the default) or "l2", Eq. 6's norm ||f_D(x) - f_D(x_hat)||_2.
  c.loss = ml_collections.ConfigDict(dict(rec=50.0, adv=0.5, ali=0.5, ali_distance="mse"))
  # Eq. 7 with both scores min-max scaled by their range over the TRAINING split ("train"),
  # recomputed at every checkpoint and stored in it; "none" fuses the raw scores.
  # ali_distance: the feature distance of L(x), as loss.ali_distance.
  c.score = ml_collections.ConfigDict(dict(gamma=0.9, scaling="train", ali_distance="mse"))
  c.augment = ml_collections.ConfigDict(dict(hflip=True, vflip=True))
  c.optimizer = _adam(1e-4)
  c.discriminator_optimizer = _adam(1e-4)
  c.batch_size = 8
  c.total_epochs = 1000.0  # the paper's
  c.log_every_steps = 100
  c.checkpoint_every_epochs = 100.0
  c.keep_checkpoints = 3
  c.nonfinite = "stop"
  c.eval_at_end = False
  c.eval = common.eval_section(batch_size=8, figure_samples=6)
  return c


def video_config(
  *, root: str, labels: str | None, input_mode: str, epochs: float, runlocal: bool
) -> ml_collections.ConfigDict:
  """The paper's video experiment (supplementary): r = 16 (16 x 16 blocks at every level),
  N = 2000 items per level, Adam 2e-4, batch 4, ``epochs`` passes (60), frames at 256x256 in
  [-1, 1] (apply a variant on top; the paper's lr for it is then set by :func:`apply_variant`,
  so set ``optimizer.lr`` after it).

  The paper does not say what the generator sees on video: ``input_mode`` "reconstruct" (each
  frame reconstructed, as on images) or "predict" (the 4 previous frames stacked on the channel
  axis, the next frame predicted, as MNAD and DMAD-PDM). Records are 5-frame clips in both
  modes, so both score the same frames (from the 5th of each video, the frames DMAD's trimmed
  labels cover); "reconstruct" uses the clip's last frame only.
  """
  c = paper_config(256, 3)
  c.data = common.video_data(root=root, labels=labels, runlocal=runlocal)
  c.t_length = 5
  c.input_mode = input_mode
  c.model.rates = (16, 16, 1)
  c.model.num_items = 2000
  c.batch_size = 4
  del c.total_epochs
  del c.checkpoint_every_epochs
  common.set_duration(c, "total", epochs=float(epochs))
  common.set_duration(c, "checkpoint_every", epochs=float(epochs) / 10)
  # Frame scores: the image score min-max normalised within each test video.
  c.eval.recipe = "none"
  return c


def shrink_for_tests(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``runlocal`` sizes: a model and run that train in seconds on a CPU (two levels, so
  apply the variant afterwards)."""
  c.model.channels = (4, 8)
  c.model.bottleneck = 8
  c.model.rates = (2, 2, 1)
  c.model.num_items = 10
  c.discriminator.features = 4
  c.discriminator.feature_dim = 8
  c.batch_size = 4
  common.set_test_durations(c)
  c.eval.batch_size = 64
  c.eval.figure_samples = 2
  return c


def parse_folder_arg(
  name: str, arg: str | None, required: dict, *, optional: dict | None = None, example: str
) -> dict:
  """The ';'-separated args of the folder-based DAAD configs: the ``required`` keys, the
  ``optional`` ones (both with their defaults), ``variant`` (default daad_plus), ``image_size``
  (256, divisible by 16), ``channels`` (3 or 1) and ``runlocal``."""
  defaults = {**required, "variant": "daad_plus", "image_size": 256, "channels": 3}
  a = common.parse_arg(
    name,
    arg,
    {**defaults, **(optional or {})},
    choices={"variant": tuple(VARIANTS), "channels": (1, 3)},
    required=tuple(required),
    example=example,
  )
  if a["image_size"] % 16:
    raise ValueError(f"configs/{name}.py: image_size {a['image_size']} must be divisible by 16")
  return a


def video_from_arg(name: str, arg: str | None, dataset: str) -> ml_collections.ConfigDict:
  """The config of ``configs/<name>.py``, DAAD on a video set (arg keys: root, labels, variant
  (daad or daad_plus, the default), input_mode, epochs, runlocal)."""
  defaults = {
    "root": None,
    "labels": None,
    "variant": "daad_plus",
    "input_mode": "reconstruct",
    "epochs": 60,
  }
  a = common.parse_arg(
    name,
    arg,
    defaults,
    choices={"variant": ("daad", "daad_plus"), "input_mode": ("reconstruct", "predict")},
    required=("root",),
    example=f"root=/data/{dataset};labels=L.npy",
  )
  c = video_config(
    root=a["root"],
    labels=a["labels"],
    input_mode=a["input_mode"],
    epochs=float(a["epochs"]),
    runlocal=a["runlocal"],
  )
  apply_variant(c, a["variant"])
  c.optimizer.lr = c.discriminator_optimizer.lr = 2e-4  # the paper's video setting
  if a["runlocal"]:
    shrink_for_tests(c)
    apply_variant(c, a["variant"])
  return c
