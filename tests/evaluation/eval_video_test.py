"""Video frame-level evaluation: the authors' Ped2 result, recipe building blocks, labels, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dmad_jax.evaluation import video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF = os.path.join(ROOT, "..", "shared", "reference", "dmad_official")
# Test001..Test012 frame counts; the first 4 frames of each video are not scored.
PED2_FRAMES = [180, 180, 150, 180, 150, 180, 180, 180, 120, 150, 180, 180]
PED2_SCORED = [n - 4 for n in PED2_FRAMES]


def _ped2():
  d = np.load(os.path.join(REF, "ped2_frame_scores.npz"))
  # The file holds per-video min-max normalised, inverted errors (high = normal) and normal=1.
  errors = {
    "deformation": 1 - d["arr_0"],
    "reconstruction": 1 - d["arr_1"],
    "gradient": 1 - d["arr_4"],
  }
  return errors, 1 - d["arr_5"].ravel().astype(int), d


def test_reproduces_the_authors_ped2_frame_auroc():
  errors, labels, d = _ped2()
  scores = video.score_frames(errors, video_lengths=PED2_SCORED, recipe="dmad_ped2")
  result = video.frame_auroc(scores, labels, PED2_SCORED)
  assert result["frame_AUROC_micro"] == pytest.approx(0.9969, abs=1e-4)
  # The same file without smoothing, and the reconstruction error alone (README facts).
  raw = 0.2 * d["arr_0"] + 0.4 * d["arr_1"] + 0.6 * d["arr_4"]
  assert roc_auc_score(labels, -raw) == pytest.approx(0.9863, abs=1e-4)
  assert roc_auc_score(labels, -d["arr_1"]) == pytest.approx(0.9484, abs=1e-4)
  # The labels in the file are the official trimmed Ped2 labels.
  official = video.load_frame_labels(os.path.join(REF, "frame_labels_ped2.npy"), PED2_SCORED)
  np.testing.assert_array_equal(official, labels)


def test_robust_moving_average_basics():
  x = np.random.default_rng(0).normal(size=50)
  # Keeping every value with unit weights is a plain centred moving average.
  plain = video.robust_moving_average(x, size=5, keep=5)
  np.testing.assert_allclose(plain[2:-2], np.convolve(x, np.ones(5) / 5, mode="valid"))
  assert np.all(plain[:2] == 1.0) and np.all(plain[-2:] == x[-1])  # DMAD's Ped2 edge rule
  const = video.robust_moving_average(np.full(30, 0.3), size=11, keep=5, head="edge", tail="edge")
  np.testing.assert_allclose(const, 0.3)
  # An outlier far from the window mean is dropped when only the closest values are kept.
  spike = np.zeros(21)
  spike[10] = 100.0
  assert video.robust_moving_average(spike, size=11, keep=5)[10] == 0.0
  short = np.arange(3.0)
  np.testing.assert_array_equal(video.robust_moving_average(short, size=11, keep=5), short)


def test_kalman_filter_follows_a_step_and_keeps_the_first_value():
  z = np.r_[np.zeros(50), np.ones(200)]
  out = video.kalman_1d(z)
  assert out[0] == z[0] and abs(out[-1] - 1.0) < 0.05 and out[55] < 1.0


@pytest.mark.parametrize("recipe", ["none", "dmad_avenue", "dmad_shanghai"])
def test_other_recipes_rank_a_synthetic_anomaly_first(recipe):
  lengths = [150, 120, 180]
  total = sum(lengths)
  rng = np.random.default_rng(1)
  labels = np.zeros(total, int)
  labels[60:110] = labels[200:260] = labels[330:400] = 1
  keys = {
    "none": ["a", "b"],
    "dmad_avenue": ["deformation", "patch"],
    "dmad_shanghai": ["deformation", "reconstruction", "object"],
  }[recipe]
  errors = {k: rng.normal(size=total) * 0.3 + 2.0 * labels for k in keys}
  scores = video.score_frames(errors, video_lengths=lengths, recipe=recipe)
  assert scores.shape == (total,) and np.isfinite(scores).all()
  assert video.frame_auroc(scores, labels, lengths)["frame_AUROC_micro"] > 0.9


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="unknown recipe 'x'"):
    video.score_frames({"a": np.zeros(3)}, video_lengths=[3], recipe="x")
  with pytest.raises(ValueError, match=r"missing \['gradient'\]"):
    video.score_frames(
      {"deformation": np.zeros(3), "reconstruction": np.zeros(3)},
      video_lengths=[3],
      recipe="dmad_ped2",
    )
  with pytest.raises(ValueError, match=r"expected \(5,\)"):
    video.score_frames({"a": np.zeros(4)}, video_lengths=[2, 3], recipe="none")


def test_labels_trimmed_untrimmed_and_mismatch(tmp_path):
  lengths = [6, 4]
  untrimmed = np.r_[np.zeros(4), [0, 1, 1, 0, 0, 0], np.zeros(4), [1, 1, 0, 0]]
  np.save(tmp_path / "mnad.npy", untrimmed)
  np.testing.assert_array_equal(
    video.load_frame_labels(str(tmp_path / "mnad.npy"), lengths), [0, 1, 1, 0, 0, 0, 1, 1, 0, 0]
  )
  np.save(tmp_path / "dmad.npy", np.ones(10))
  assert video.load_frame_labels(str(tmp_path / "dmad.npy"), lengths).sum() == 10
  np.save(tmp_path / "bad.npy", np.ones(12))
  with pytest.raises(ValueError, match=r"12 labels.*10 scored frames.*per video: \[6, 4\]"):
    video.load_frame_labels(str(tmp_path / "bad.npy"), lengths)


def test_macro_auroc_handles_single_class_videos():
  lengths = [4, 4]
  scores = np.array([0.1, 0.2, 0.9, 0.8, 0.5, 0.6, 0.7, 0.9])
  labels = np.array([0, 0, 1, 1, 1, 1, 1, 1])  # the second video is entirely anomalous
  r = video.frame_auroc(scores, labels, lengths)
  assert 0.0 <= r["frame_AUROC_macro"] <= 1.0 and r["num_anomalous"] == 6


def test_video_auc_command_reproduces_ped2(tmp_path):
  errors, labels, _ = _ped2()
  np.savez(tmp_path / "scores.npz", video_lengths=np.array(PED2_SCORED), **errors)
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "dmad_jax",
      "video-auc",
      f"--scores={tmp_path / 'scores.npz'}",
      f"--labels={os.path.join(REF, 'frame_labels_ped2.npy')}",
      "--recipe=dmad_ped2",
      f"--plot={tmp_path / 'videos.png'}",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout[out.stdout.index("{") :])
  assert result["frame_AUROC_micro"] == pytest.approx(0.9969, abs=1e-4)
  assert os.path.getsize(tmp_path / "videos.png") > 0
