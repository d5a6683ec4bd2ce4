"""MNAD (prediction variant, CVPR 2020) on CUHK Avenue, as released.

The memory-guided baseline DMAD-PDM grew from (shared/spec/seed_systems.md Sec. 6), next to
``configs/avenue_pdm.py``.

Data: the common frame dump <root>/{training,testing}/frames/<video>/*.jpg, read in colour (MNAD
reads every data set in colour), and the frame labels (MNAD's untrimmed avenue.npy or DMAD's
trimmed frame_labels_avenue.npy; the two differ in 429 frames, so report which one you used).

  ARG="root=/data/avenue;labels=/data/frame_labels_avenue.npy"
  dmad train --config "configs/avenue_mnad.py:$ARG" --workdir runs/avenue_mnad
  dmad eval  --config "configs/avenue_mnad.py:$ARG" --workdir runs/avenue_mnad

Arg keys (separated by ';' or ','): root, labels, epochs (60), runlocal (tiny model and image
size 32 for tests). MNAD's reported CUHK Avenue frame AUROC is 88.5 (DMAD's rerun: 88.5); it is
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
  return mnad.from_arg("avenue_mnad", arg, "avenue")
