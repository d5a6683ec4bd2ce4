"""DAAD / DAAD+ (or an ablation row) on your own images in the MVTec-style folder layout.

  <root>/train/good/*.png|jpg|...     normal training images
  <root>/test/good/*                  normal test images
  <root>/test/<defect>/*              anomalous test images, one folder per defect type

  dmad train --config 'configs/folder_daad.py:root=/data/bottle;variant=daad_plus' --workdir runs/b
  dmad eval  --config 'configs/folder_daad.py:root=/data/bottle;variant=daad_plus' --workdir runs/b

Args (';'-separated): root (required), variant (ae, memae, ae_skip, daad, daad_plus; default
daad_plus), image_size (default 256; divisible by 16 and, with the paper's rates, by 128),
channels (3 or 1), runlocal (tiny model and run, for tests). The recipe is the paper's MVTec one
(``dmad_jax.configs.daad.paper_config``: 1000 epochs of the training folder); set the run length
with ``--config.total_epochs``.
"""

import ml_collections

from dmad_jax.configs import daad


def parse_arg(arg: str | None) -> dict:
  return daad.parse_folder_arg(
    "folder_daad", arg, {"root": None}, example="root=/data/bottle;variant=daad_plus"
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  c = daad.paper_config(image_size=a["image_size"], channels=a["channels"])
  c.data.root = a["root"]
  daad.apply_variant(c, a["variant"])
  if a["runlocal"]:
    daad.shrink_for_tests(c)
    daad.apply_variant(c, a["variant"])
  return c
