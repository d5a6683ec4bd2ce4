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
# The installed console script, run as users run it.
DMAD = os.path.join(os.path.dirname(sys.executable), "dmad")
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
  # The released ShanghaiTech conf_avg has no window to write in a short video: all ones.
  np.testing.assert_array_equal(
    video.robust_moving_average(short, size=11, keep=5, head=1.0, short="head"), np.ones(3)
  )


def test_shanghai_recipe_scores_a_video_shorter_than_its_window_as_normal():
  """A 40-frame video (< 69) gets per-video normality 1 before the global passes, as released:
  its frames score as the smoothing of ones, whatever its errors."""
  lengths = [120, 40, 100]
  rng = np.random.default_rng(2)
  errors = {k: rng.normal(size=260) for k in ("deformation", "reconstruction", "object")}
  a = video.score_frames(errors, video_lengths=lengths, recipe="dmad_shanghai")
  changed = {k: v.copy() for k, v in errors.items()}
  for v in changed.values():
    v[120:160] = rng.normal(size=40) * 5  # other errors in the short video only
  b = video.score_frames(changed, video_lengths=lengths, recipe="dmad_shanghai")
  np.testing.assert_array_equal(a, b)


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


def test_mnad_recipe_is_the_released_per_video_fusion_and_ranks_as_it():
  """MNAD's test: per video, normality = 0.6 psnr_norm + 0.4 (1 - dist_norm), with
  psnr_norm = (psnr - min) / (max - min); the recipe's anomaly score is 1 - that (up to the
  1e-8 of the min-max denominator), so the frame AUROC is MNAD's."""
  lengths = [40, 25, 31]
  rng = np.random.default_rng(3)
  psnr = rng.normal(30, 2, sum(lengths))
  dist = rng.uniform(0, 0.1, sum(lengths))
  labels = (rng.uniform(size=sum(lengths)) < 0.3).astype(int)
  got = video.score_frames(
    {"neg_psnr": -psnr, "feature_distance": dist}, video_lengths=lengths, recipe="mnad"
  )
  normality = []
  cuts = np.cumsum(lengths)[:-1]
  for p, d in zip(np.split(psnr, cuts), np.split(dist, cuts), strict=True):
    p_norm = (p - p.min()) / (p.max() - p.min())
    d_norm = (d - d.min()) / (d.max() - d.min())
    normality.append(0.6 * p_norm + 0.4 * (1 - d_norm))
  normality = np.concatenate(normality)
  np.testing.assert_allclose(got, 1 - normality, atol=1e-7)
  auc = video.frame_auroc(got, labels, lengths)["frame_AUROC_micro"]
  assert auc == pytest.approx(roc_auc_score(1 - labels, normality), abs=1e-12)


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
  env = dict(os.environ)
  out = subprocess.run(
    [
      DMAD,
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


# ---------------------------------------------------------------------------------------------
# Host-side errors: Avenue's frame differencing, ShanghaiTech's object error.
# ---------------------------------------------------------------------------------------------
def _blob(shape, y, x, size=4, value=1.0):
  m = np.zeros(shape)
  m[y : y + size, x : x + size] = value
  return m


def test_box_mean_max_matches_the_jax_filter():
  import jax.numpy as jnp

  from dmad_jax.ops import filters

  m = np.random.default_rng(0).normal(size=(20, 17))
  for ks in [(21, 16), (7, 15), (3, 2)]:
    ref = float(filters.box_filter_max(jnp.asarray(m, jnp.float32)[None, ..., None], ks)[0])
    assert video.box_mean_max(m, ks) == pytest.approx(ref, rel=1e-5)


def test_frame_difference_removes_static_anomalies():
  """A static object (and one that jitters by a pixel) vanishes after the frame difference; a
  moving one does not."""
  shape = (32, 32)
  diff = video.FrameDifference(history=3, radius=1, start="lookahead")
  outs = []
  for t in range(10):
    d = _blob(shape, 4, 4) + _blob(shape, 20, 10 + t % 2)  # static + jittering by 1 pixel
    d += _blob(shape, 12, 2 + 3 * t, value=0.5)  # moving 3 pixels per frame
    outs += diff.push(d)
  outs += diff.flush()
  assert len(outs) == 10
  for t, out in enumerate(outs):
    assert np.all(out[4:8, 4:8] == 0) and np.all(out[20:24, 10:15] == 0)
    moving = out[12:16, :].max()
    # The first two frames are part of their own (look-ahead) history.
    assert moving == 0 if t < 2 else moving == 0.5


def test_avenue_errors_count_a_static_anomaly_only_when_it_appears():
  shape = (128, 128)
  host = video.HostFrameErrors("dmad_avenue")
  n = 12
  diff = np.stack([_blob(shape, 40, 40, 10) if t >= 6 else np.zeros(shape) for t in range(n)])
  offset = np.stack([_blob(shape, 60, 20 + 5 * t, 6) for t in range(n)])
  # Fed in two uneven batches, in order.
  host.add(np.arange(5), {"diff": diff[:5], "offset": offset[:5]})
  host.add(np.arange(5, n), {"diff": diff[5:], "offset": offset[5:]})
  e = host.errors()
  assert set(e) == {"avenue_patch", "avenue_deformation"}
  patch = e["avenue_patch"]
  assert patch[6] == pytest.approx(100 / (21 * 16))  # the 10x10 object appears: box mean of 1s
  assert np.all(np.delete(patch, 6) == 0)  # before and after that frame it is static
  deformation = e["avenue_deformation"]
  assert deformation[0] == 0 and np.all(deformation[1:] > 0)  # a moving deformation remains
  with pytest.raises(RuntimeError, match="in order"):
    host.add(np.array([13]), {"diff": diff[:1], "offset": offset[:1]})


def test_object_error_takes_the_worst_object():
  shape = (40, 40)
  error = np.zeros(shape)
  mask = np.zeros(shape, bool)
  mask[2:8, 2:8] = True  # 6x6 object: contour area 25
  error[2:8, 2:8] = 2.0
  mask[30:33, 30:33] = True  # 3x3 object: contour area 4 <= 13, ignored
  error[30:33, 30:33] = 9.0
  assert video.object_error(mask, error) == pytest.approx(2.0)
  # A ring is filled: its hole counts in the mean (external contour, drawn filled).
  mask[15:25, 15:25] = True
  mask[18:22, 18:22] = False
  error[18:22, 18:22] = 50.0
  assert video.object_error(mask, error) == pytest.approx(16 * 50.0 / 100)
  assert video.object_error(np.zeros(shape, bool), error) == 0.0
  host = video.HostFrameErrors("dmad_shanghai")
  maps = {"object_mask": np.stack([mask, 0 * mask]), "error": np.stack([error] * 2)}
  host.add(np.arange(2), maps)
  np.testing.assert_allclose(host.errors()["shanghai_object"], [8.0, 0.0])
