"""IGD on one MVTec AD category: the released code's global, local or fused model (spec Sec. 5).

  dmad train --config 'configs/mvtec_igd.py:root=/data/mvtec;category=bottle;weights=r18.npz' \
    --workdir runs/igd_bottle
  dmad eval  --config 'configs/mvtec_igd.py:root=/data/mvtec;category=bottle;weights=r18.npz' \
    --workdir runs/igd_bottle
  dmad train --workdir runs/igd_wood_local \
    --config 'configs/mvtec_igd.py:root=/data/mvtec;category=wood;variant=local;encoder=trainable'

ImageNet weights for the global model's frozen ResNet18: ``dmad convert-weights
resnet18-f37072fd.pth r18.npz``.

Args (';'-separated): root (the MVTec AD folder), category (one of ``CATEGORIES``), variant
(global, local or fused; default global), weights (the converted ResNet18), encoder (frozen or
trainable), kd (the workdir of the local encoder's distillation run, configs/mvtec_igd_kd.py:
the released setup; without it local and fused need encoder=trainable, which trains the encoder
with the generator), epochs (default 256), runlocal (tiny widths, random frozen backbone, 2
steps: tests only).

Recipe: 256x256, ImageNet normalisation, random horizontal flips; Adam lr 1e-4, betas (0, 0.9),
L2 weight decay 1e-6 (critic 0), poly decay 0.9 per step; batch 16 images (local: 2 images = 450
patches); E-step every 10 epochs; a checkpoint every 10 epochs, the last one evaluated (the code
reports the best test AUC over checkpoints; dmad_jax does not select on the test set). The
paper's detection mean is ``igd.PAPER_MVTEC_DETECTION`` (not reproduced here: no MVTec AD on this
machine).
"""

import ml_collections

from dmad_jax.configs import common, igd, mvtec

CATEGORIES = mvtec.CATEGORIES


def parse_arg(arg: str | None) -> dict:
  return common.parse_arg(
    "mvtec_igd",
    arg,
    {
      "root": None,
      "category": None,
      "variant": "global",
      "weights": "",
      "encoder": "frozen",
      "epochs": 256.0,
      "kd": "",
    },
    choices={"category": CATEGORIES, "variant": igd.VARIANTS, "encoder": igd.ENCODERS},
    required=("root", "category"),
    example="root=/data/mvtec;category=bottle;weights=r18.npz",
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  c = igd.recipe(a["variant"], encoder=a["encoder"], weights=a["weights"], epochs=a["epochs"])
  c.data.root = mvtec.category_root(a["root"], a["category"])
  if a["kd"]:
    igd.use_kd(c, a["kd"])
  if a["runlocal"]:
    igd.shrink_for_tests(c)
  return c
