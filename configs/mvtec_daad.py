"""DAAD / DAAD+ (or an ablation row) on one MVTec AD category, the paper's recipe.

  dmad train --config 'configs/mvtec_daad.py:root=/data/mvtec;category=bottle' --workdir runs/b
  dmad eval  --config 'configs/mvtec_daad.py:root=/data/mvtec;category=bottle' --workdir runs/b
  dmad train --config 'configs/mvtec_daad.py:root=/data/mvtec;category=grid;variant=ae' ...

Args (';'-separated): root (the MVTec AD folder holding one folder per category), category (one
of ``CATEGORIES``), variant (ae, memae, ae_skip, daad, daad_plus; default daad_plus), epochs
(default 1000, the paper's), image_size (default 256), channels (default 3; the gray categories
are read as RGB), runlocal.

Paper (Sec. 4.1, supp. Tab. 7/8): 256x256 in [-1, 1], horizontal and vertical flips, r = (8, 8,
1), N = 500, Adam (0.9, 0.999) lr 1e-4 (2e-4 for DAAD+), weight decay 0, batch 8, 1000 epochs,
loss weights 50 / 0.5 / 0.5, gamma = 0.9. Target image AUROC (DAAD+) in ``PAPER_AUROC``: mean
0.895; the ablation means are AE .794, MemAE .802, AE+Skip .736, DAAD .845.
"""

import ml_collections

from dmad_jax.configs import daad, mvtec

CATEGORIES = mvtec.CATEGORIES
# DAAD+ image AUROC per category, paper Tab. 1 / Tab. 3 (not yet reproduced by dmad_jax).
PAPER_AUROC = {
  "carpet": 0.866,
  "grid": 0.957,
  "leather": 0.862,
  "tile": 0.882,
  "wood": 0.982,
  "bottle": 0.976,
  "cable": 0.844,
  "capsule": 0.767,
  "hazelnut": 0.921,
  "metal_nut": 0.758,
  "pill": 0.900,
  "screw": 0.987,
  "toothbrush": 0.992,
  "transistor": 0.876,
  "zipper": 0.859,
}


def parse_arg(arg: str | None) -> dict:
  return daad.parse_folder_arg(
    "mvtec_daad",
    arg,
    {"root": None, "category": None},
    optional={"epochs": 1000},
    example="root=/data/mvtec;category=bottle",
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  if a["category"] not in CATEGORIES:
    raise ValueError(
      f"configs/mvtec_daad.py: unknown category {a['category']!r}; one of {', '.join(CATEGORIES)}"
    )
  c = daad.paper_config(image_size=a["image_size"], channels=a["channels"])
  c.data.root = mvtec.category_root(a["root"], a["category"])
  daad.apply_variant(c, a["variant"])
  c.total_epochs = float(a["epochs"])
  c.checkpoint_every_epochs = a["epochs"] / 10
  if a["runlocal"]:
    daad.shrink_for_tests(c)
    daad.apply_variant(c, a["variant"])
  return c
