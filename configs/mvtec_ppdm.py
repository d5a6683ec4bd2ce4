"""DMAD-PPDM on one MVTec AD category, the official code's recipe (seed_systems.md Sec. 2).

  dmad train --config 'configs/mvtec_ppdm.py:root=/data/mvtec;category=bottle;weights=wrn50_2.npz' \
    --workdir runs/ppdm_bottle
  dmad eval  --config 'configs/mvtec_ppdm.py:root=/data/mvtec;category=bottle;weights=wrn50_2.npz' \
    --workdir runs/ppdm_bottle

ImageNet weights: download and convert as in dmad_jax/convert.py's docstring, e.g.
``dmad convert-weights wide_resnet50_2-95faca4d.pth wrn50_2.npz``.

Args (';'-separated): root (the MVTec AD folder holding one folder per category), category (one
of ``CATEGORIES``), weights (the converted teacher, ``model.backbone_weights``), epochs (default
400), image_size (default 256, a multiple of 32), vq (1 = the VQ bottleneck, the official
detection models; 0 = RD's OCBE, which the official code uses for its localisation numbers),
runlocal (resnet18 with RANDOM teacher weights at 64x64, two steps: for tests only).

Recipe: 256x256, ImageNet normalisation, no augmentation; teacher wide_resnet50_2 (frozen, BN
running statistics); VQ K = 200 on layer3, 64-channel reductions; OffsetNet heads 1/8 (8 px) and
1/2 (3 px), CoordConv blocks of 4 px; all loss weights 1; AdamW lr 5e-3, betas (0.5, 0.999),
weight decay 0.01, cosine decay to 0 (per step here, per epoch there), batch 8, 400 epochs,
seed 111, a checkpoint every 10 epochs (the last is evaluated). Score: Gaussian sigma 4;
alpha = 0.2 for the geometric categories (screw, carpet, metal_nut), 0.05 otherwise
(``score.alpha``, ``dmad_jax.configs.mvtec.alpha_for``); the two terms are min-max scaled with
the TRAINING split's ranges (the official code uses the test set's). Paper targets (image /
pixel AUROC, %) in ``PAPER_AUROC``.
"""

import ml_collections

from dmad_jax.configs import mvtec

CATEGORIES = mvtec.CATEGORIES
# DMAD supp. Tab. 10 / 11 (alpha grid-searched): image AUROC, pixel AUROC in %. Not reproduced
# by dmad_jax yet.
PAPER_AUROC = {
  "carpet": (100.0, 99.1),
  "grid": (100.0, 99.2),
  "leather": (100.0, 99.5),
  "tile": (100.0, 96.0),
  "wood": (100.0, 95.5),
  "bottle": (100.0, 98.9),
  "cable": (99.1, 98.1),
  "capsule": (98.9, 98.3),
  "hazelnut": (100.0, 99.1),
  "metal_nut": (100.0, 97.7),
  "pill": (97.3, 98.7),
  "screw": (100.0, 99.6),
  "toothbrush": (100.0, 99.4),
  "transistor": (98.7, 95.4),
  "zipper": (99.6, 98.3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = mvtec.parse_ppdm_arg(arg)
  c = mvtec.ppdm_base(a, model_name="ppdm", epochs=400, batch_size=8)
  c.model.vq = bool(a["vq"])
  if a["runlocal"]:
    mvtec.shrink_ppdm_for_tests(c, a)
  return c
