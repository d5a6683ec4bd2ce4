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

import math

import ml_collections

from configs import digits_daad, folder_daad

# Training images per category of MVTec AD (train/good), to turn epochs into steps.
TRAIN_COUNTS = {
  "bottle": 209,
  "cable": 224,
  "capsule": 219,
  "carpet": 280,
  "grid": 264,
  "hazelnut": 391,
  "leather": 245,
  "metal_nut": 220,
  "pill": 267,
  "screw": 320,
  "tile": 230,
  "toothbrush": 60,
  "transistor": 213,
  "wood": 247,
  "zipper": 240,
}
CATEGORIES = tuple(TRAIN_COUNTS)
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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = folder_daad.parse_arg(
    arg, name="mvtec_daad", keys=("root", "category"), ints=("image_size", "channels", "epochs")
  )
  if a["category"] not in CATEGORIES:
    raise ValueError(f"mvtec_daad: unknown category {a['category']!r}; one of {CATEGORIES}")
  c = digits_daad.paper_config(image_size=a["image_size"], channels=a["channels"])
  c.data.root = f"{a['root'].rstrip('/')}/{a['category']}"
  digits_daad.apply_variant(c, a["variant"])
  epochs = a.get("epochs") or 1000
  c.total_steps = epochs * math.ceil(TRAIN_COUNTS[a["category"]] / c.batch_size)
  c.checkpoint_every_steps = max(1, c.total_steps // 10)
  if a["runlocal"]:
    digits_daad.shrink_for_tests(c)
    digits_daad.apply_variant(c, a["variant"])
  return c
