"""DAAD / DAAD+ on CUHK Avenue: the paper's video experiment.

Supplementary (shared/spec/seed_systems.md Sec. 3): r = 16, N = 2000, Adam 2e-4, batch 4,
60 epochs; reported frame AUROC 0.829.

Data: the common frame dump <root>/{training,testing}/frames/<video>/*.jpg, read in colour, and
the frame labels (DMAD's trimmed frame_labels_avenue.npy or MNAD's untrimmed avenue.npy).

  ARG="root=/data/avenue;labels=/data/frame_labels_avenue.npy"
  dmad train --config "configs/avenue_daad.py:$ARG" --workdir runs/avenue_daad
  dmad eval  --config "configs/avenue_daad.py:$ARG" --workdir runs/avenue_daad
  dmad train --config "configs/avenue_daad.py:$ARG;input_mode=predict" --workdir runs/avenue_daad_p

Arg keys (separated by ';' or ','): root, labels, variant (daad or daad_plus, the default),
input_mode ("reconstruct", the default: each frame is reconstructed, as the image experiments
do; "predict": the 4 previous frames in, the next frame out, as MNAD and DMAD-PDM; the paper
does not say which it used), epochs (60), runlocal (tiny model at 32x32 for tests). Not
reproduced here (the data set is not available on this machine).

Frame scores: the detector's image score (DAAD: the reconstruction error; DAAD+: Eq. 7, R and L
min-max scaled over the training split), min-max normalised within each test video (recipe
``none``).
"""

from dmad_jax.configs import daad


def get_config(arg: str | None = None):
  return daad.video_from_arg("avenue_daad", arg, "avenue")
