"""DAGM 2007 facts the DAGM configs share: the classes and the RD recipe on them.

ARD's supplementary runs DAGM with "the same settings as MVTec": RD4AD's MVTec recipe
(``mvtec.rd_settings``: 256x256, frozen wide_resnet50_2, Adam 5e-3 betas (0.5, 0.999), batch 16,
200 epochs, seed 111). Training uses each class's non-defective ``Train`` images, the test split
is the whole ``Test`` folder with the weak (elliptic) defect masks (``dmad_jax.data.dagm``).
"""

from __future__ import annotations

import ml_collections

from dmad_jax.configs import ard, common, mvtec

CLASSES = tuple(range(1, 11))


def parse_arg(name: str, arg: str | None, *, with_attention: bool = False) -> dict:
  """The ';'-separated args of the DAGM configs: root, class (1-10), weights, epochs (0 = 200),
  image_size (0 = 256, or 64 with runlocal), runlocal; ARD adds attention and position."""
  defaults = {"root": None, "class": 0, "weights": "", "epochs": 0, "image_size": 0}
  choices = {"class": CLASSES}
  if with_attention:
    defaults.update(ard.parse_keys())
    choices.update(ard.choices())
  a = common.parse_arg(
    name,
    arg,
    defaults,
    choices=choices,
    required=("root", "class"),
    example="root=/data/dagm;class=1;weights=wrn50_2.npz",
  )
  mvtec.check_image_size(name, a["image_size"])
  return a


def rd_config(a: dict) -> ml_collections.ConfigDict:
  """RD on DAGM class ``a["class"]``."""
  data = dict(name="dagm", root=a["root"], class_id=a["class"], channels=3, validate=True)
  c = mvtec.rd_settings(mvtec.ppdm_base(a, model_name="rd", epochs=200, batch_size=16, data=data))
  if a["runlocal"]:
    mvtec.shrink_ppdm_for_tests(c, a)
  return c
