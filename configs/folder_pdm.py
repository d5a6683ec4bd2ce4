"""DMAD-PDM on your own images in the MVTec-style folder layout.

  <root>/train/good/*.png|jpg|...     normal training images
  <root>/test/good/*                  normal test images
  <root>/test/<defect>/*              anomalous test images, one folder per defect type
  <root>/validation/good/*            optional normal images for the threshold (without it,
                                      20% of train/good is held out of training for it)

  dmad train --config configs/folder_pdm.py:root=/data/bottle,image_size=256 --workdir runs/bottle
  dmad eval  --config configs/folder_pdm.py:root=/data/bottle,image_size=256 --workdir runs/bottle
  dmad predict --workdir runs/bottle new1.png new2.png --out runs/bottle/predictions

Arg keys: root (required), image_size (default 256, divisible by 8), channels (3 or 1),
runlocal (tiny model and run, for tests).

The run is 100 epochs of the training images, whatever their number (a 50-image ``train/good``
without ``validation/`` trains on 40 of them: 500 steps of batch 8; 5,000 images, 62,500 steps),
with a checkpoint every 10 epochs; change it with ``--config.total_epochs=N``.
"""

import ml_collections

from dmad_jax.configs import common, pdm


def parse_arg(arg: str | None) -> dict:
  a = common.parse_arg(
    "folder_pdm",
    arg,
    {"root": None, "image_size": 256, "channels": 3},
    choices={"channels": (1, 3)},
    required=("root",),
    example="root=/data/bottle,image_size=256",
  )
  if a["image_size"] % 8:
    raise ValueError(f"configs/folder_pdm.py: image_size {a['image_size']} must be divisible by 8")
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
  if not a["runlocal"]:
    # The official Ped2 widths, with a 3-channel image in and out.
    c.model.channels = (32, 64, 128, 256)
    c.model.skip_channels = (32, 32)
    c.model.num_codes = 200
    c.model.gen_features = 32
    c.model.offset_features = 64
    c.optimizer.lr = 2e-4
    c.optimizer.lr_multipliers = {"template": 50.0}
    c.batch_size = 8
    common.set_duration(c, "total", epochs=100.0)
    common.set_duration(c, "checkpoint_every", epochs=10.0)
    c.log_every_steps = 100
    c.eval.batch_size = 8
  return c
