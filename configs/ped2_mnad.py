"""MNAD (prediction variant, CVPR 2020) on UCSD Ped2, as released.

The memory-guided baseline DMAD-PDM grew from (shared/spec/seed_systems.md Sec. 6), next to
``configs/ped2_pdm.py``.

Data: the common frame dump <root>/{training,testing}/frames/<video>/*.jpg, read in colour (MNAD
reads every data set in colour), and the frame labels (MNAD's untrimmed ped2.npy or DMAD's
trimmed frame_labels_ped2.npy).

  ARG="root=/data/ped2;labels=/data/frame_labels_ped2.npy"
  dmad train --config "configs/ped2_mnad.py:$ARG" --workdir runs/ped2_mnad
  dmad eval  --config "configs/ped2_mnad.py:$ARG" --workdir runs/ped2_mnad

Arg keys (separated by ';' or ','): root, labels, epochs (60), runlocal (tiny model and image
size 32 for tests). MNAD's reported UCSD Ped2 frame AUROC is 97.0 (DMAD's rerun: 97.8); it is
not reproduced here (the data set is not available on this machine).

The eval job scores the test frames in order and updates the memory with a frame's queries
when its point score is below 0.01 (``score.update_threshold``; ``score.test_update=False``
scores with the trained memory only); the ``mnad`` recipe then min-max normalises -PSNR and the
feature distance per video and fuses them 0.6 / 0.4.

Deviations from the released code, by design: the cosine schedule decays per step rather than
per epoch, and frames are resized with the data sources' resize (see dmad_jax.data.video).
"""

from dmad_jax.configs import mnad


def get_config(arg: str | None = None):
  return mnad.from_arg("ped2_mnad", arg, "ped2")
