"""MVTec AD facts the MVTec configs share: the categories, their training-set sizes and the
DMAD-PPDM / RD recipe of the official code (shared/spec/seed_systems.md Sec. 2 and 6)."""

from __future__ import annotations

import ml_collections

from dmad_jax.configs import common

# Training images per category of MVTec AD (train/good).
TRAIN_COUNTS = {
  "bottle": 209,
  "cable": 224,
  "capsule": 219,
  "carpet": 280,
  "grid": 264,
  "hazelnut": 391,
  "leather": 245,
  "metal_nut": 220,
  "pill": 267,
  "screw": 320,
  "tile": 230,
  "toothbrush": 60,
  "transistor": 213,
  "wood": 247,
  "zipper": 240,
}
CATEGORIES = tuple(TRAIN_COUNTS)

# PPDM's deformation-score weight: 0.2 for the categories with geometric defects, else 0.05.
GEOMETRIC = ("screw", "carpet", "metal_nut")
ALPHA_GEOMETRIC = 0.2
ALPHA_DEFAULT = 0.05


def alpha_for(category: str) -> float:
  """The official weight of the deformation score for ``category``."""
  return ALPHA_GEOMETRIC if category in GEOMETRIC else ALPHA_DEFAULT


def category_root(root: str, category: str) -> str:
  return f"{root.rstrip('/')}/{category}"


def parse_ppdm_arg(arg: str | None, name: str = "mvtec_ppdm") -> dict:
  """The ';'-separated args of the PPDM / RD configs: root, category, weights, epochs (0 = the
  config's default), image_size (0 = 256, or 64 with runlocal; a multiple of 32), vq, runlocal."""
  defaults = {"root": None, "category": None, "weights": "", "epochs": 0, "image_size": 0, "vq": 1}
  a = common.parse_arg(
    name,
    arg,
    defaults,
    choices={"category": CATEGORIES, "vq": (0, 1)},
    required=("root", "category"),
    example="root=/data/mvtec;category=bottle;weights=wrn50_2.npz",
  )
  check_image_size(name, a["image_size"])
  return a


def check_image_size(name: str, size: int) -> None:
  """The teacher-student models need a multiple of 32 (the embedding is at S/32); 0 = default."""
  if size % 32:
    raise ValueError(f"configs/{name}.py: image_size {size} must be a multiple of 32")


def ppdm_base(a: dict, *, model_name: str, epochs: int, batch_size: int, data=None):
  """The shared RD / PPDM config for the parsed args ``a`` (model switches left to the caller).

  ``data``: the ``config.data`` section (its ``image_size`` is set here); default the MVTec
  category folder ``a["root"]/a["category"]``."""
  size = a["image_size"] or (64 if a["runlocal"] else 256)
  c = ml_collections.ConfigDict()
  c.seed = 111
  common.set_compute(c)
  c.model_name = model_name
  if data is None:
    data = dict(
      name="folder",
      root=category_root(a["root"], a["category"]),
      channels=3,  # grid, screw and zipper are gray: repeated to RGB, as torchvision does
      validate=True,
    )
  c.data = ml_collections.ConfigDict(dict(data, image_size=size))
  c.model = ml_collections.ConfigDict(
    dict(
      arch="wide_resnet50_2",
      image_size=size,
      deform=True,
      vq=True,
      num_codes=200,
      vq_beta=0.25,
      reduce_channels=64,
      offset_features=64,
      head_strides=((2, 2, 2, 1), (2, 1)),
      max_offsets=(8.0, 3.0),
      pe_reduction=4,
      backbone_weights=a["weights"],
      random_teacher=False,
    )
  )
  # As released; paper Eq. 18 is norm_backward=1.0 with smooth_kind="gradient_l1".
  c.loss = ml_collections.ConfigDict(
    dict(
      distill=1.0,
      vq=1.0,
      offset=1.0,
      norm_backward=0.0,
      smooth_size=3,
      smooth_kind="filter",
      cycle=1.0,
    )
  )
  # forward_df=True adds Eq. 21's forward term (os1), which the released scorer leaves out.
  c.score = ml_collections.ConfigDict(
    dict(
      alpha=alpha_for(a.get("category")),
      sigma=4.0,
      scaling="train",
      pixel_map="fused",
      forward_df=False,
    )
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(
      name="adamw",
      lr=5e-3,
      b1=0.5,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.01,
      schedule="cosine",
      warmup_steps=0,
      grad_clip_norm=0.0,
    )
  )
  c.batch_size = batch_size
  # Epochs of the category's training images, converted to steps from the data itself.
  common.set_duration(c, "total", epochs=float(a["epochs"] or epochs))
  common.set_duration(c, "log_every", epochs=1.0)
  common.set_duration(c, "checkpoint_every", epochs=10.0)
  c.keep_checkpoints = 2
  c.nonfinite = "stop"
  c.eval_at_end = False
  c.eval = common.eval_section(batch_size=8, figure_samples=6)
  return c


def rd_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns a ``ppdm_base`` config into RD4AD's recipe: no OffsetNet, RD's OCBE, the cosine map
  as the score (sigma 4, no scaling), Adam (betas 0.5, 0.999) without weight decay or schedule."""
  c.model.deform = False
  c.model.vq = False
  c.score = ml_collections.ConfigDict(dict(sigma=4.0, scaling="none", pixel_map="rec"))
  c.optimizer.name = "adam"
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  return c


def shrink_ppdm_for_tests(c, a: dict) -> None:
  """runlocal: resnet18 with a random teacher, narrow layers, two steps."""
  c.model.arch = "resnet18"
  c.model.num_codes = 8
  c.model.reduce_channels = 8
  c.model.offset_features = 8
  # An explicit weights arg still loads them; otherwise the teacher is random (with a warning).
  c.model.random_teacher = not a["weights"]
  c.batch_size = 4
  common.set_test_durations(c)
  c.eval.batch_size = 8
  c.eval.figure_samples = 2
