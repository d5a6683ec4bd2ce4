"""Reproduces the authors' UCSD Ped2 frame AUROC from their released per-frame scores.

  python experiments/ped2_official_scores.py [--shared ../shared]

Reads shared/reference/dmad_official/ped2_frame_scores.npz (per-video min-max normalised,
inverted errors of the authors' checkpoint), turns them back into errors, applies the
``dmad_ped2`` recipe of ``dmad_jax.evaluation.video`` and writes
``experiments/results/ped2_official.json``, the per-video plot
``experiments/results/ped2_official_scores.png`` and ``ped2_official_errors.npz`` in the format
``dmad video-auc --scores`` reads.
"""

import argparse
import json
import os

import numpy as np

from dmad_jax.evaluation import video

HERE = os.path.dirname(os.path.abspath(__file__))
PED2_FRAMES = [180, 180, 150, 180, 150, 180, 180, 180, 120, 150, 180, 180]  # Test001..Test012


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", default=os.path.join(HERE, "..", "..", "shared"))
  args = parser.parse_args()
  ref = os.path.join(args.shared, "reference", "dmad_official")
  d = np.load(os.path.join(ref, "ped2_frame_scores.npz"))
  lengths = [n - 4 for n in PED2_FRAMES]
  errors = {
    "deformation": 1 - d["arr_0"],
    "reconstruction": 1 - d["arr_1"],
    "gradient": 1 - d["arr_4"],
  }
  labels = video.load_frame_labels(os.path.join(ref, "frame_labels_ped2.npy"), lengths)
  out = os.path.join(HERE, "results")
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, "ped2_official_errors.npz"), video_lengths=lengths, **errors)
  result = {}
  for recipe in ("dmad_ped2", "none"):
    scores = video.score_frames(errors, video_lengths=lengths, recipe=recipe)
    result[recipe] = video.frame_auroc(scores, labels, lengths)
    if recipe == "dmad_ped2":
      video.plot_video_scores(
        os.path.join(out, "ped2_official_scores.png"),
        scores,
        labels,
        lengths,
        title=f"Ped2, authors' scores, recipe dmad_ped2: frame AUROC "
        f"{result[recipe]['frame_AUROC_micro']:.4f}",
      )
  with open(os.path.join(out, "ped2_official.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
