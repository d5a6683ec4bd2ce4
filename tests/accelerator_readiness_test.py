"""The stored measurements behind issue 19's acceptance lines: the training process's memory
against the PyTorch twin's (experiments/bench_train.py) and the demo protocol in bfloat16
(experiments/bfloat16_demo.py). The scripts themselves take minutes; these check what they
stored, so a rerun that regresses fails here."""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")


def _load(name):
  with open(os.path.join(RESULTS, name)) as f:
    return json.load(f)


def test_batch_4_train_step_peaks_below_the_twin_in_the_same_run():
  rows = {r["case"]: r for r in _load("bench_train.json")["results"]}
  b4, before, remat = rows["train_b4"], rows["train_b4_no_release"], rows["train_b4_remat"]
  assert b4["peak_rss_gib"] <= b4["torch_twin"]["peak_rss_gib"]
  assert b4["median_s"] < b4["torch_twin"]["median_s"]
  # What each change bought: the scheduler's buffers, then remat's.
  assert remat["temp_buffers_gib"] < b4["temp_buffers_gib"] < before["temp_buffers_gib"]
  assert b4["peak_rss_gib"] < before["peak_rss_gib"] - 0.5


def test_step_time_with_the_memory_scheduler_is_within_the_runs_spread():
  rows = {r["case"]: r for r in _load("bench_train_scheduler.json")["results"]}
  now, before = rows["train_b4"], rows["train_b4_no_release"]
  assert len(now["round_medians_s"]) == len(before["round_medians_s"]) >= 6
  assert now["median_s"] <= 1.05 * before["median_s"]
  assert min(now["round_medians_s"]) <= max(before["round_medians_s"])


def test_bfloat16_demo_reaches_the_float32_auroc():
  result = _load("bfloat16_demo.json")
  f32, b16 = result["runs"]["float32"], result["runs"]["bfloat16"]
  assert (f32["compute_dtype_of_the_run"], b16["compute_dtype_of_the_run"]) == (
    "float32",
    "bfloat16",
  )
  assert f32["steps"] == b16["steps"] == 1200 and f32["seed"] == b16["seed"]
  assert result["config"] == os.path.join("configs", "digits_pdm.py")
  assert abs(b16["image_AUROC"] - f32["image_AUROC"]) <= 0.01
  assert result["image_AUROC_bfloat16_minus_float32"] == b16["image_AUROC"] - f32["image_AUROC"]
