"""DMAD-PDM on your own images in the MVTec-style folder layout.

  <root>/train/good/*.png|jpg|...     normal training images
  <root>/test/good/*                  normal test images
  <root>/test/<defect>/*              anomalous test images, one folder per defect type
  <root>/validation/good/*            optional normal images for the threshold (without it,
                                      20% of train/good is held out of training for it)

  dmad train --config configs/folder_pdm.py:root=/data/bottle,image_size=256 --workdir runs/bottle
  dmad eval  --config configs/folder_pdm.py:root=/data/bottle,image_size=256 --workdir runs/bottle
  dmad predict --workdir runs/bottle new1.png new2.png --out runs/bottle/predictions

Arg keys: root (required), image_size (default 256; divisible by 8, by 16 with
recipe=prototype_bank), channels (3 or 1), recipe, runlocal (tiny model and run, for tests).

``recipe``: ``released`` (default: DMAD-PDM's released Ped2 model, widths 32-256, compressed
skips, the encoder mask, 200 codes) or ``prototype_bank`` (the image-mode recipe chosen on the
digits' validation split, ``dmad_jax.configs.pdm.prototype_bank``: a bank of 64 prototypes, one
per image, warped onto the input by the deformation pyramid, each image scored by the squared
error left after the coarse deformation of the best fitting of its 32 nearest prototypes).

How the default was chosen: ``python experiments/select_folder_defaults.py --json``
(experiments/results/folder_selection.json) builds folders of 50 training images (digit-1 scans)
with a labelled ``validation/`` folder (32 ones, 32 other digits, none of them in test/), trains
the released recipe and the image-mode recipe with banks of 64, 16 and 8 codes on two draws, and
scores each on validation only: the released recipe had the highest mean validation image AUROC
(1.0; the image-mode recipe 0.992 at best), so it is the default. What scales with the data:
the duration is 100 epochs of the training images (not a step count), checkpoints every 10
epochs, CoordConv blocks of 8 pixels (16 with prototype_bank) at any ``image_size``.
``python experiments/folder_own_data.py [--recipe prototype_bank]`` reports both on the test
folders.
"""

import ml_collections

from dmad_jax.configs import common, pdm


def parse_arg(arg: str | None) -> dict:
  a = common.parse_arg(
    "folder_pdm",
    arg,
    {"root": None, "image_size": 256, "channels": 3, "recipe": "released"},
    choices={"channels": (1, 3), "recipe": ("released", "prototype_bank")},
    required=("root",),
    example="root=/data/bottle,image_size=256",
  )
  return a


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  c = pdm.base(a["runlocal"])
  size, ch = a["image_size"], a["channels"]
  c.data = ml_collections.ConfigDict(
    dict(name="folder", root=a["root"], image_size=size, channels=ch, validate=True)
  )
  pdm.set_image_size(c, size, in_channels=ch, out_channels=ch)
  # The decision threshold `dmad predict` uses, fitted by the eval job (or `dmad calibrate`) and
  # stored with the checkpoint (dmad_jax.evaluation.calibration): the 0.99 prediction bound of a
  # lognormal fitted to the scores of normal images the model did not train on,
  # <root>/validation/good/* when the folder has it, else 20% of train/good held out of training
  # (--config.data.validation_fraction).
  common.set_held_out_threshold(c)
  if a["recipe"] == "prototype_bank":
    # The image-mode recipe chosen on the digits' validation split (dmad_jax.configs.pdm.
    # prototype_bank): one code per image from a bank of 64 prototypes, no skips and no encoder
    # mask, fields that see the reference, the error left after the coarse deformation as the
    # score; five levels whatever the size (the code averages the deepest map), widths twice
    # the digits'. Not the default: on folders of 50 digit scans it reached image AUROC
    # 0.91-0.99 against 0.97-1.00 for the released recipe (experiments/folder_own_data.py).
    pdm.prototype_bank(c, a["runlocal"])
    if not a["runlocal"]:
      c.model.channels = (32, 64, 128, 128, 32)
      c.model.coord_blocks = size // 16
      c.model.gen_features = 32
      c.model.offset_features = 32
  elif not a["runlocal"]:
    # The released recipe: the official Ped2 widths, with the image in and out.
    c.model.channels = (32, 64, 128, 256)
    c.model.skip_channels = (32, 32)
    c.model.num_codes = 200
    c.model.gen_features = 32
    c.model.offset_features = 64
    c.optimizer.lr = 2e-4
    c.optimizer.lr_multipliers = {"template": 50.0}
  if not a["runlocal"]:
    c.batch_size = 8
    common.set_duration(c, "total", epochs=100.0)
    common.set_duration(c, "checkpoint_every", epochs=10.0)
    c.log_every_steps = 100
    c.eval.batch_size = 8
  levels = len(c.model.channels)
  if size % 2 ** (levels - 1):
    raise ValueError(
      f"configs/folder_pdm.py: image_size {size} must be divisible by {2 ** (levels - 1)} "
      f"({levels} levels, each halving the size)"
    )
  return c
