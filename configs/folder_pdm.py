"""DMAD-PDM on your own images in the MVTec-style folder layout.

  <root>/train/good/*.png|jpg|...     normal training images
  <root>/test/good/*                  normal test images
  <root>/test/<defect>/*              anomalous test images, one folder per defect type

  dmad train --config configs/folder_pdm.py:root=/data/bottle,image_size=256 --workdir runs/bottle
  dmad eval  --config configs/folder_pdm.py:root=/data/bottle,image_size=256 --workdir runs/bottle
  dmad predict --workdir runs/bottle new1.png new2.png --out runs/bottle/predictions

Arg keys: root (required), image_size (default 256, divisible by 8), channels (3 or 1),
runlocal (tiny model and run, for tests).
"""

import ml_collections

from configs import digits_pdm


def parse_arg(arg: str) -> dict:
  out = {"root": None, "image_size": 256, "channels": 3, "runlocal": False}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key == "runlocal":
      out["runlocal"] = True
    elif key == "root":
      out["root"] = value
    elif key in ("image_size", "channels"):
      out[key] = int(value)
    else:
      raise ValueError(f"folder_pdm: unknown config arg {item!r} (root, image_size, channels)")
  if not out["root"]:
    raise ValueError("folder_pdm: give the data root, e.g. configs/folder_pdm.py:root=/data/x")
  if out["image_size"] % 8:
    raise ValueError(f"folder_pdm: image_size {out['image_size']} must be divisible by 8")
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  c = digits_pdm.get_config("runlocal" if a["runlocal"] else "")
  size, ch = a["image_size"], a["channels"]
  c.data = ml_collections.ConfigDict(
    dict(name="folder", root=a["root"], image_size=size, channels=ch, validate=True)
  )
  c.model.image_size = size
  c.model.in_channels = ch
  c.model.out_channels = ch
  c.model.coord_blocks = size // 8
  # The decision threshold `dmad predict` uses, fitted by the eval job (or `dmad calibrate`) and
  # stored with the checkpoint (dmad_jax.evaluation.calibration): the 0.99 quantile of the
  # scores of normal images. split="validation" (<root>/validation/good/*, normal images held out
  # from training) gives a better threshold than the training images when you have them.
  c.calibration = ml_collections.ConfigDict(
    dict(method="normal_quantile", split="train", quantile=0.99)
  )
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
    c.total_steps = 20000
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    c.eval.batch_size = 8
  return c
