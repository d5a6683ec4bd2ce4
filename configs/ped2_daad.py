"""DAAD / DAAD+ on UCSD Ped2: the paper's video experiment.

Supplementary (shared/spec/seed_systems.md Sec. 3): r = 16, N = 2000, Adam 2e-4, batch 4,
60 epochs; reported frame AUROC 0.941.

Data: the common frame dump <root>/{training,testing}/frames/<video>/*.jpg, read in colour, and
the frame labels (DMAD's trimmed frame_labels_ped2.npy or MNAD's untrimmed ped2.npy).

  ARG="root=/data/ped2;labels=/data/frame_labels_ped2.npy"
  dmad train --config "configs/ped2_daad.py:$ARG" --workdir runs/ped2_daad
  dmad eval  --config "configs/ped2_daad.py:$ARG" --workdir runs/ped2_daad
  dmad train --config "configs/ped2_daad.py:$ARG;input_mode=predict" --workdir runs/ped2_daad_p

Arg keys (separated by ';' or ','): root, labels, variant (daad or daad_plus, the default),
input_mode ("reconstruct", the default: each frame is reconstructed, as the image experiments
do; "predict": the 4 previous frames in, the next frame out, as MNAD and DMAD-PDM; the paper
does not say which it used), epochs (60), runlocal (tiny model at 32x32 for tests). Not
reproduced here (the data set is not available on this machine).

Frame scores: the detector's image score (DAAD: the reconstruction error; DAAD+: Eq. 7, R and L
min-max scaled over the training split), min-max normalised within each test video (recipe
``none``).
"""

import ml_collections

from dmad_jax.configs import common, daad


def parse_arg(arg: str | None) -> dict:
  defaults = {
    "root": None,
    "labels": None,
    "variant": "daad_plus",
    "input_mode": "reconstruct",
    "epochs": 60,
  }
  return common.parse_arg(
    "ped2_daad",
    arg,
    defaults,
    choices={"variant": ("daad", "daad_plus"), "input_mode": ("reconstruct", "predict")},
    required=("root",),
    example="root=/data/ped2;labels=L.npy",
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  c = daad.video_config(
    root=a["root"],
    labels=a["labels"],
    input_mode=a["input_mode"],
    epochs=float(a["epochs"]),
    runlocal=a["runlocal"],
  )
  daad.apply_variant(c, a["variant"])
  c.optimizer.lr = c.discriminator_optimizer.lr = 2e-4  # the paper's video setting
  if a["runlocal"]:
    daad.shrink_for_tests(c)
    daad.apply_variant(c, a["variant"])
  return c
