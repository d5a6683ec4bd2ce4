"""The video notebook runs top to bottom on the authors' released Ped2 scores and reproduces their
frame AUROC step by step (recipes, post-processing table, `dmad video-auc`, figures)."""

import pytest


def test_video_notebook_reproduces_the_authors_ped2_auroc(run_notebook):
  summary, pictures = run_notebook("video.ipynb")
  assert summary["small"] is True
  assert summary["num_frames"] == 1962 and summary["num_videos"] == 12
  assert summary["num_anomalous"] == 1620
  assert summary["videos_plotted"] == 12
  recipes = summary["recipes"]
  assert set(recipes) == {"none", "dmad_ped2"}
  ped2 = recipes["dmad_ped2"]["frame_AUROC_micro"]
  assert abs(ped2 - 0.99690) < 1e-4
  assert summary["fused_smoothed_micro"] == ped2
  assert summary["cli_video_auc_micro"] == pytest.approx(ped2, abs=1e-12)
  # Each post-processing step of the released recipe helps: fusion beats every single error,
  # smoothing beats the plain fusion (and each smoothed error its raw self).
  assert abs(summary["fused_unsmoothed_micro"] - 0.9863) < 1e-4
  assert summary["fused_unsmoothed_micro"] < ped2
  singles = summary["single_errors"]
  assert abs(singles["reconstruction"]["frame_AUROC_micro"] - 0.9484) < 1e-4
  assert max(r["frame_AUROC_micro"] for r in singles.values()) < summary["fused_unsmoothed_micro"]
  steps = summary["steps"]
  for name in singles:
    raw = steps[f"1. {name} alone, as released"]["frame_AUROC_micro"]
    assert raw == singles[name]["frame_AUROC_micro"]
    assert steps[f"3. {name} alone, smoothed"]["frame_AUROC_micro"] > raw
  assert recipes["none"]["frame_AUROC_micro"] < ped2
  for r in (*recipes.values(), *steps.values()):
    assert 0.5 < r["frame_AUROC_macro"] <= 1.0
  video = summary["smoothing_video"]
  assert video["after"] > video["before"]
  assert pictures >= 3  # per-video plots before and after smoothing, one video in detail
