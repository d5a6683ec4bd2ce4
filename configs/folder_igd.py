"""IGD on your own images in the MVTec-style folder layout.

  <root>/train/good/*.png|jpg|...     normal training images
  <root>/test/good/*                  normal test images
  <root>/test/<defect>/*              anomalous test images, one folder per defect type
  <root>/validation/good/*            optional normal images for the threshold (without it,
                                      20% of train/good is held out of training for it)

  dmad train --config 'configs/folder_igd.py:root=/data/bottle;weights=r18.npz' --workdir runs/b
  dmad eval  --config 'configs/folder_igd.py:root=/data/bottle;weights=r18.npz' --workdir runs/b
  dmad predict --workdir runs/b new1.png --out runs/b/predictions

Args (';'-separated): root (required), variant (global, local, fused; default global), weights
(the converted ResNet18 for the frozen global encoder), encoder (frozen or trainable),
image_size (default 256; global: at least 176 for its 5-scale MS-SSIM, local: a multiple of
16), channels (3 or 1), runlocal (tests only). The recipe is configs/mvtec_igd.py's; set the run
length with ``--config.total_epochs``.
"""

import ml_collections

from dmad_jax.configs import common, igd


def parse_arg(arg: str | None) -> dict:
  return common.parse_arg(
    "folder_igd",
    arg,
    {
      "root": None,
      "variant": "global",
      "weights": "",
      "encoder": "frozen",
      "image_size": 256,
      "channels": 3,
    },
    choices={"variant": igd.VARIANTS, "encoder": igd.ENCODERS, "channels": (1, 3)},
    required=("root",),
    example="root=/data/bottle;weights=r18.npz",
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  c = igd.recipe(
    a["variant"],
    encoder=a["encoder"],
    weights=a["weights"],
    image_size=a["image_size"],
    channels=a["channels"],
  )
  c.data.root = a["root"]
  # The threshold `dmad predict` uses: the 0.99 prediction bound of a lognormal fitted to the
  # scores of normal images held out of training (<root>/validation/good/*, else 20% of
  # train/good).
  common.set_held_out_threshold(c)
  if a["runlocal"]:
    igd.shrink_for_tests(c)
  return c
