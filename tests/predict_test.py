"""Prediction on new images (`Predictor`, `dmad predict`) and the stored calibration, end to end
on a tiny MVTec-layout folder with held-out normal validation images."""

from __future__ import annotations

import csv
import json
import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn.metrics import f1_score

from dmad_jax import data as data_lib
from dmad_jax.configs import load_module
from dmad_jax.data import FolderSource, ImageReadError
from dmad_jax.evaluation import calibration, job
from dmad_jax.models import get_detector
from dmad_jax.predict import Predictor, load_config
from dmad_jax.train import checkpoint, trainer
from dmad_jax.train import state as state_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
folder_pdm = load_module(os.path.join(CONFIGS, "folder_pdm.py"))

SIZE = 32
QUANTILE = 0.8
EVAL_STEP, CALIBRATE_STEP, BARE_STEP = 2, 3, 1


def _write_folder(root, rng):
  """Blobs are normal, blobs with a bright square are defects; gray and RGB files mixed."""
  yy, xx = np.mgrid[:SIZE, :SIZE]
  for split, folder, n in [
    ("train", "good", 6),
    ("validation", "good", 5),
    ("test", "good", 3),
    ("test", "scratch", 3),
  ]:
    (root / split / folder).mkdir(parents=True)
    for i in range(n):
      cy, cx = rng.uniform(12, 20, 2)
      img = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
      if folder == "scratch":
        y, x = rng.integers(2, 24, 2)
        img[y : y + 6, x : x + 6] = 255
      g = np.clip(img, 0, 255).astype(np.uint8)
      pil = Image.fromarray(np.stack([g] * 3, -1)) if i % 2 else Image.fromarray(g)
      pil.save(root / split / folder / f"{i:03d}.png")


def _write_run(config, workdir, steps):
  """A run directory as `dmad train` leaves it (config.json, one checkpoint per step) holding a
  state of the trainer's structure with random parameters (BatchNorm scales and variances 1):
  nothing tested here depends on training, and neither the train step nor the initialisation
  (~20 s of CPU for PDM) is compiled."""
  spec = data_lib.get_source(config.data, "train").element_spec
  abstract = state_lib.abstract(config, get_detector(config), spec)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if not np.issubdtype(leaf.dtype, np.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    if getattr(path[-1], "key", None) in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  state = jax.tree_util.tree_map_with_path(fill, abstract)
  mngr = checkpoint.manager(workdir)
  for step in steps:
    checkpoint.save(mngr, step, state.replace(step=np.int32(step)))
  mngr.wait_until_finished()
  trainer._write_config(config, workdir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Steps 1-3 of one state: the eval job calibrates step 2 (normal quantile of the validation
  split), `calibrate` step 3 (F1 on the test split); step 1 keeps no calibration."""
  root = tmp_path_factory.mktemp("predict")
  data = root / "data"
  _write_folder(data, np.random.default_rng(0))
  config = folder_pdm.get_config(f"root={data},image_size={SIZE},runlocal")
  with config.unlocked():
    config.total_steps = 3
    config.eval.batch_size = 4  # 6 test images: the last batch is padded.
    config.calibration.split = "validation"
    config.calibration.quantile = QUANTILE
  workdir = str(root / "run")
  _write_run(config, workdir, (BARE_STEP, EVAL_STEP, CALIBRATE_STEP))
  metrics = job.evaluate(config, workdir, EVAL_STEP)
  return {"data": data, "workdir": workdir, "config": config, "metrics": metrics}


@pytest.fixture(scope="module")
def predictor(run):
  return Predictor.from_workdir(run["workdir"], EVAL_STEP)


def _eval_scores(run):
  with np.load(os.path.join(run["workdir"], "eval", f"scores_{EVAL_STEP}.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_predictor_reproduces_the_eval_job_scores(run, predictor):
  saved = _eval_scores(run)
  test = FolderSource(run["data"], "test", image_size=SIZE)
  paths = [test.paths[i] for i in saved["index"]]
  result = predictor.predict_files(paths)
  np.testing.assert_allclose(result["score"], saved["score"], rtol=1e-6, atol=1e-7)
  for name in ("rec", "df"):
    np.testing.assert_allclose(result["scores"][name], saved[name], rtol=1e-6, atol=1e-7)
  # Decoded arrays (uint8 gray and RGB of any size, or floats in [0, 1]) give the same inputs.
  pictures = [np.asarray(Image.open(p)) for p in paths]
  from_arrays = predictor(pictures[1:])
  np.testing.assert_array_equal(from_arrays["score"], result["score"][1:])
  floats = predictor([p.astype(np.float64) / 255.0 for p in pictures[1:3]])
  np.testing.assert_array_equal(floats["score"], result["score"][1:3])
  # Labels and normalisation follow the stored threshold.
  threshold = predictor.threshold
  np.testing.assert_array_equal(result["is_anomalous"], result["score"] > threshold)
  np.testing.assert_array_equal(result["normalized_score"] > 0.5, result["score"] > threshold)
  assert result["map"].shape == result["normalized_map"].shape == (6, SIZE, SIZE)
  # The eval job reports this threshold's test metrics.
  metrics = run["metrics"]
  assert metrics["threshold"] == threshold
  assert (metrics["threshold_method"], metrics["threshold_split"]) == ("lognormal", "validation")
  pred = (saved["score"] > threshold).astype(int)
  assert metrics["threshold_F1"] == pytest.approx(f1_score(saved["labels"], pred, zero_division=0))


def test_threshold_is_the_lognormal_bound_of_the_validation_normal_scores(run, predictor):
  stored = calibration.load(run["workdir"], EVAL_STEP)
  validation = FolderSource(run["data"], "validation", image_size=SIZE)
  scores = predictor.predict_files(validation.paths)["score"].astype(np.float64)
  logs = np.log(scores)
  bound = stats.t.ppf(QUANTILE, 4) * logs.std(ddof=1) * np.sqrt(1 + 1 / 5)
  assert stored["threshold"] == pytest.approx(np.exp(logs.mean() + bound), rel=1e-5)
  assert stored["score_min"] == pytest.approx(scores.min(), abs=1e-6)
  assert stored["score_max"] == pytest.approx(scores.max(), abs=1e-6)
  assert (stored["method"], stored["split"], stored["quantile"]) == (
    "lognormal",
    "validation",
    QUANTILE,
  )
  assert (stored["step"], stored["num_images"], stored["optimistic"]) == (EVAL_STEP, 5, False)
  assert stored["preprocessing"] == {
    "source": "folder",
    "image_size": SIZE,
    "channels": 3,
    "value_range": [-1.0, 1.0],
    "resize": "PIL bilinear",
  }
  # The eval job reuses a calibration made with the same settings and refits a stale one.
  assert calibration.is_current(stored, run["config"])
  other = load_config(run["workdir"])
  with other.unlocked():
    other.calibration.quantile = 0.5
  assert not calibration.is_current(stored, other)
  # So does one fitted on another score (here: another deformation weight).
  assert stored["score_settings"] == json.loads(run["config"].score.to_json())
  other = load_config(run["workdir"])
  with other.unlocked():
    other.score.alpha = other.score.alpha + 1.0
  assert not calibration.is_current(stored, other)


def test_calibrate_f1_on_the_test_split_is_stored_as_optimistic(run, caplog):
  config = load_config(run["workdir"])  # What `dmad calibrate --workdir` reads.
  with config.unlocked():
    config.calibration.method = "f1"
    config.calibration.split = "test"
  with caplog.at_level(logging.WARNING, logger="dmad_jax"):
    record = calibration.calibrate(config, run["workdir"], CALIBRATE_STEP)
  assert "optimistic" in caplog.text
  assert calibration.load(run["workdir"], CALIBRATE_STEP) == record
  saved = _eval_scores(run)  # Step 3 holds the same state as the evaluated step 2.
  threshold, at = calibration.f1_threshold(saved["score"], saved["labels"])
  assert record["threshold"] == pytest.approx(threshold, abs=1e-6)
  assert (record["method"], record["split"], record["quantile"], record["optimistic"]) == (
    "f1",
    "test",
    None,
    True,
  )
  assert record["split_F1"] == pytest.approx(at["F1"])
  assert (record["num_normal"], record["num_anomalous"]) == (3, 3)


@pytest.mark.slow
def test_predict_command_writes_heatmaps(run, predictor, dmad_cli, tmp_path):
  test = FolderSource(run["data"], "test", image_size=SIZE)
  images = [test.paths[0], test.paths[-1]]  # One normal, one anomalous.
  out = tmp_path / "out"
  done = dmad_cli(
    "predict", f"--workdir={run['workdir']}", *images, f"--out={out}", f"--step={EVAL_STEP}"
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "of 2 images anomalous" in done.stdout
  for name in ("000_heatmap.png", "002_heatmap.png"):
    with Image.open(out / name) as img:
      assert img.format == "PNG" and img.size[0] > img.size[1]
  with open(out / "predictions.json") as f:
    written = json.load(f)
  expected = predictor.predict_files(images)
  assert written["step"] == EVAL_STEP and written["calibration"]["threshold"] == predictor.threshold
  rows = written["images"]
  assert [r["path"] for r in rows] == [os.path.abspath(p) for p in images]
  np.testing.assert_allclose([r["score"] for r in rows], expected["score"], rtol=1e-6, atol=1e-7)
  assert [r["is_anomalous"] for r in rows] == expected["is_anomalous"].tolist()
  with open(out / "predictions.csv") as f:
    table = list(csv.DictReader(f))
  assert [float(r["score"]) for r in table] == [r["score"] for r in rows]
  assert [r["heatmap"] for r in table] == [
    str(out / "000_heatmap.png"),
    str(out / "002_heatmap.png"),
  ]


def test_clear_errors(run, predictor, tmp_path):
  workdir = run["workdir"]
  with pytest.raises(calibration.CalibrationMissingError, match="dmad calibrate --workdir"):
    Predictor.from_workdir(workdir, BARE_STEP)
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  good = FolderSource(run["data"], "test", image_size=SIZE).paths[0]
  with pytest.raises(ImageReadError, match="broken.png"):
    predictor.predict_files([good, bad])
  with pytest.raises(ValueError, match=r"float pixels must be finite and in \[0, 1\]"):
    predictor([np.full((8, 8), 2.0)])
  with pytest.raises(ValueError, match="put a single image in a list"):
    predictor(np.zeros((SIZE, SIZE, 3), np.uint8))
  with pytest.raises(FileNotFoundError, match="config.json"):
    Predictor.from_workdir(str(tmp_path))
  trainer._write_config(run["config"], str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Predictor.from_workdir(str(tmp_path))
  config = load_config(workdir)
  with config.unlocked():
    config.calibration.split = "val"
  with pytest.raises(ValueError, match="calibration.split must be one of"):
    calibration.settings(config)


def test_f1_threshold_is_the_best_cut():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 60)
  scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # Ties on purpose.
  threshold, at = calibration.f1_threshold(scores, labels)
  best = max(f1_score(labels, (scores >= t).astype(int)) for t in np.unique(scores))
  assert at["F1"] == pytest.approx(best)
  assert f1_score(labels, (scores > threshold).astype(int)) == pytest.approx(best)
  assert not np.any(scores == threshold)  # Half-way between scores: rounding cannot flip one.
  with pytest.raises(ValueError, match="needs normal and anomalous images"):
    calibration.f1_threshold(scores, np.zeros_like(labels))


def test_exported_file_predicts_what_the_predictor_does_and_holds_no_kernel(
  run, predictor, tmp_path
):
  """`Predictor.export`: the CPU file reproduces the restored step (to 1e-5: it runs the plain
  XLA formulations, not the CPU kernels) with the same calibration and decisions; files for
  CUDA and TPU are written from this CPU host and deserialize to programs for those platforms
  without any dmad_jax kernel."""
  import re

  from dmad_jax import exported

  test = FolderSource(run["data"], "test", image_size=SIZE)
  want = predictor.predict_files(test.paths)
  meta = predictor.export(str(tmp_path / "cpu.dmad"))
  assert meta["step"] == EVAL_STEP and meta["calibration"] == predictor.calibration
  loaded = Predictor.from_exported(str(tmp_path / "cpu.dmad"))
  got = loaded.predict_files(test.paths)
  np.testing.assert_allclose(got["score"], want["score"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["map"], want["map"], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got["is_anomalous"], want["is_anomalous"])
  assert loaded.threshold == predictor.threshold and loaded.preprocessing == predictor.preprocessing
  # A batch of any size (the batch dimension is symbolic).
  assert loaded(np.zeros((1, SIZE, SIZE, 3), np.uint8))["score"].shape == (1,)
  predictor.export(str(tmp_path / "accel.dmad"), ("cuda", "tpu"))
  _, program = exported.read(str(tmp_path / "accel.dmad"))
  assert tuple(program.platforms) == ("cuda", "tpu")
  assert not re.search(r'custom_call\s*@dmad_|call_target_name\s*=\s*"dmad_', program.mlir_module())
  with pytest.raises(ValueError, match="exported for \\['cuda', 'tpu'\\]"):
    exported.load(str(tmp_path / "accel.dmad"))
  (tmp_path / "bad.dmad").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="bad.dmad: not a dmad export"):
    exported.load(str(tmp_path / "bad.dmad"))
