"""The one-class protocol of the seed papers' MNIST / Fashion-MNIST / CIFAR-10 tables, shared by
``configs/oneclass_<model>.py``: train on the training images of one class, test on the whole
test split (that class normal, every other class anomalous), image AUROC per class and the mean
over the ten classes. Data through TensorFlow Datasets (the ``tfds`` extra).

Each seed paper's reported means are in :data:`PAPER` (AUROC in [0, 1]); dmad_jax has not
reproduced them (the data sets cannot be downloaded on its development machine):
experiments/reproduce_tables.py runs a whole table when the data are present.
"""

from __future__ import annotations

import ml_collections

from dmad_jax.configs import ard, common, igd, mvtec

# TFDS name -> channels of its images.
DATASETS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3}
CLASSES = tuple(range(10))
# Mean image AUROC over the ten classes as each seed paper reports it.
PAPER = {
  "ard": ard.PAPER_ONE_CLASS["ard"],  # ARD supplementary Tab. III
  "rd": ard.PAPER_ONE_CLASS["rd"],  # RD as ARD's supplementary reports it (ResNet34)
  "ppdm": {"mnist": 0.995, "fashion_mnist": 0.963},  # DMAD supplementary Tab. 9
  "daad": {"mnist": 0.990, "cifar10": 0.753},  # DAAD Tab. 2 (OCGAN's protocol)
  "igd": dict(igd.PAPER_ONE_CLASS),  # IGD Tab. 1
}


def parse_arg(name: str, arg: str | None, extra: dict | None = None, choices=None) -> dict:
  """The ';'-separated args: dataset (mnist, fashion_mnist, cifar10), normal (the class, 0-9),
  data_dir (TFDS data dir; default TFDS's own), epochs (0 = the config's), runlocal, and the
  config's ``extra`` keys."""
  return common.parse_arg(
    name,
    arg,
    {"dataset": None, "normal": 0, "data_dir": "", "epochs": 0, **(extra or {})},
    choices={"dataset": tuple(DATASETS), "normal": CLASSES, **(choices or {})},
    required=("dataset",),
    example="dataset=mnist;normal=3",
  )


def data(a: dict, image_size: int, channels: int | None = None) -> ml_collections.ConfigDict:
  """``config.data`` of class ``a["normal"]`` of ``a["dataset"]`` at ``image_size``; gray sets
  are served with ``channels`` (default: the data set's own)."""
  return ml_collections.ConfigDict(
    dict(
      name="tfds",
      tfds_name=a["dataset"],
      protocol=f"one_class={a['normal']}",
      image_size=image_size,
      channels=channels or DATASETS[a["dataset"]],
      data_dir=a["data_dir"] or None,
    )
  )


def resnet_config(
  name: str, arg: str | None, *, model_name: str, extra=None, choices=None
) -> tuple[ml_collections.ConfigDict, dict]:
  """The one-class config of a teacher-student model (RD, ARD, PPDM) and its parsed args.

  RD / ARD: the settings ARD's supplementary gives for this protocol (ResNet34 teacher and
  student, Adam lr 1e-3 with RD4AD's betas (0.5, 0.999), batch 16, 200 epochs, a checkpoint every
  10 epochs). PPDM: its MVTec recipe (``mvtec.ppdm_base``) for DMAD's 60 epochs of batch 8 (the
  epochs and batch size DMAD gives for MNIST). Images are resized to ``image_size`` (default 256,
  the MVTec size; 32 with runlocal) and gray ones repeated to RGB for the ImageNet teacher.
  """
  a = parse_arg(name, arg, {"weights": "", "image_size": 0, **(extra or {})}, choices)
  mvtec.check_image_size(name, a["image_size"])
  if a["runlocal"] and not a["image_size"]:
    a["image_size"] = 32
  source = data(a, 0, channels=3)
  if model_name == "ppdm":
    c = mvtec.ppdm_base(a, model_name="ppdm", epochs=60, batch_size=8, data=source)
  else:
    c = mvtec.rd_settings(
      mvtec.ppdm_base(a, model_name="rd", epochs=200, batch_size=16, data=source)
    )
    c.model.arch = "resnet34"
    c.optimizer.lr = 1e-3
  c.keep_checkpoints = 20  # every checkpoint stays until `dmad eval --watch` has seen it
  c.eval.batch_size = 64
  if a["runlocal"]:
    mvtec.shrink_ppdm_for_tests(c, a)
  return c, a
