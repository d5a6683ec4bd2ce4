"""DMAD-PDM on scikit-learn's handwritten digits (the paper's toy experiment, Sec. 4.2, Fig. 6).

Normal = odd digits, anomalous = even digits by default; ``one_class=k`` trains on digit k only.

  dmad train --config configs/digits_pdm.py --workdir runs/digits
  dmad eval  --config configs/digits_pdm.py --workdir runs/digits
  dmad train --config configs/digits_pdm.py:protocol=one_class=3 --workdir runs/digits3
  dmad train --config configs/digits_pdm.py:runlocal --workdir /tmp/t   # seconds, for tests

Arg keys: protocol (``one_class=K`` or ``normal=A,B,...``; default normal=1,3,5,7,9), runlocal.
The recipe is ``dmad_jax.configs.pdm.base`` (optimizer, run length) with the image-mode model,
loss and score of ``dmad_jax.configs.pdm.prototype_bank``.
"""

import ml_collections

from dmad_jax.configs import common, pdm


def parse_arg(arg: str | None) -> dict:
  return common.parse_arg("digits_pdm", arg, {"protocol": "normal=1,3,5,7,9"})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg)
  c = pdm.base(a["runlocal"])
  c.data = ml_collections.ConfigDict(
    dict(
      name="digits", protocol=a["protocol"], image_size=32, channels=1, test_fraction=0.3, seed=0
    )
  )
  # A stratified 20% of the train part is the labelled validation split: never trained on, it
  # holds the normal images the decision threshold is fitted on (a lognormal bound at 0.99 of
  # their scores) and is where settings are compared; the test split is only reported.
  common.set_held_out_threshold(c)
  # Image mode as DMAD means it (dmad_jax.configs.pdm.prototype_bank): one code per image from
  # a bank of 64 kept in use by an EMA codebook with restarts, no skips and no encoder mask, the
  # unwarped reference trained to match, fields that see the reference, and a squared error
  # against the best fitting of an image's nearest prototypes as the score. Chosen on validation
  # splits by experiments/select_digits_defaults.py (experiments/results/digits_selection.json):
  # candidates x five scores x five weights of the deformation term on one validation split,
  # then the finalists x four scores by their mean validation AUROC over five split seeds; see
  # README.
  pdm.prototype_bank(c, a["runlocal"])
  if not a["runlocal"]:
    # Five levels: the code is the average of a 2x2 map, CoordConv blocks of 2 divide them all.
    c.model.channels = (16, 32, 64, 64, 32)
    c.model.coord_blocks = 2
    # A stiff coarse field: predicted on a 4x4 grid (strides 2, 2, 2), half the resolution of
    # the 8x8 scans, so that it absorbs slant and thickness but bends a prototype less onto
    # another digit's shape (chosen over the 8x8 grid on five validation splits).
    c.model.head_strides = ((2, 2, 2), (1, 1))
    # The score: the squared errors of both stages summed (what the fine field could not fit
    # either counts, as the training loss sums them), against the best fitting of all 64
    # prototypes; chosen among four score variants on the same five validation splits.
    c.score.sum_stages = True
    c.score.prototypes = 64
    c.total_steps = 1200
    c.checkpoint_every_steps = 600
  # The eval job also reports classical detectors (KDE, k-NN, PCA, one-class SVM, isolation
  # forest) fitted on the same training images (dmad_jax.evaluation.baselines).
  c.eval.baselines = not a["runlocal"]
  return c
