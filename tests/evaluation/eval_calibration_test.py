"""The decision threshold's split and what the eval job reports of it (no model: stored records
and score arrays stand in for a trained one)."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dmad_jax.configs import common, load_module
from dmad_jax.evaluation import calibration

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def _folder(root, n_train=10, validation=False):
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("test", 2), ("validation", 3 if validation else 0)):
    for i in range(n):
      os.makedirs(root / split / "good", exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(
        root / split / "good" / f"{i}.png"
      )


def test_image_configs_fit_the_threshold_on_images_held_out_of_training():
  assert calibration.settings(ml_collections.ConfigDict())["split"] == "validation"
  for name, arg in (
    ("digits_pdm.py", "runlocal"),
    ("folder_pdm.py", "root=/data/x,image_size=32"),
    ("folder_igd.py", "root=/data/x"),
  ):
    c = load_module(os.path.join(CONFIGS, name)).get_config(arg)
    assert c.data.validation_fraction == common.VALIDATION_FRACTION, name
    assert c.data.seed == 0, name  # which images are held out: a key users can set
    assert calibration.settings(c) == {
      "method": "lognormal",
      "split": "validation",
      "quantile": common.THRESHOLD_QUANTILE,
    }, name


def test_the_validation_split_is_what_each_source_holds_out(tmp_path):
  digits = load_module(os.path.join(CONFIGS, "digits_pdm.py")).get_config("runlocal")
  val = calibration.split_source(digits, "validation")
  assert len(val) and set(np.unique(val.labels)) == {0, 1}  # labelled: normal and anomalous
  with digits.unlocked():
    digits.data.validation_fraction = 0.0
  with pytest.raises(ValueError, match="validation_fraction > 0.*calibration.split=train"):
    calibration.split_source(digits, "validation")

  _folder(tmp_path / "a")
  folder = load_module(os.path.join(CONFIGS, "folder_pdm.py")).get_config(
    f"root={tmp_path / 'a'},image_size=8,runlocal"
  )
  held = calibration.split_source(folder, "validation")
  assert len(held) == 2 and held.labels.tolist() == [0, 0]
  assert all(p.startswith(str(tmp_path / "a" / "train" / "good")) for p in held.paths)
  with folder.unlocked():
    folder.data.validation_fraction = 0.0
  with pytest.raises(FileNotFoundError, match="validation_fraction=0.2") as info:
    calibration.split_source(folder, "validation")
  assert str(tmp_path / "a" / "validation") in str(info.value)

  _folder(tmp_path / "b", validation=True)
  with folder.unlocked():
    folder.data.root = str(tmp_path / "b")
  given = calibration.split_source(folder, "validation")
  assert len(given) == 3 and "/validation/good/" in given.paths[0]


def test_the_eval_job_reports_the_share_of_test_normals_the_threshold_flags(tmp_path):
  os.makedirs(calibration.calibration_path(str(tmp_path), 7).rsplit("/", 1)[0])
  rng = np.random.default_rng(0)
  held_out = rng.normal(size=200)
  record = calibration.fit(held_out, np.zeros(200), method="normal_quantile", quantile=0.95)
  calibration.save(
    str(tmp_path),
    7,
    {
      **record,
      "method": "normal_quantile",
      "split": "validation",
      "quantile": 0.95,
      "num_normal": 200,
    },
  )
  labels = np.r_[np.zeros(1000), np.ones(50)]
  scores = np.r_[rng.normal(size=1000), rng.normal(3.0, 1.0, 50)]
  out = calibration.for_eval(ml_collections.ConfigDict(), str(tmp_path), 7, scores, labels)
  assert out["threshold"] == record["threshold"]
  assert (out["threshold_split"], out["threshold_num_normal"]) == ("validation", 200)
  assert out["threshold_nominal_FPR"] == pytest.approx(0.05)
  assert out["threshold_FPR"] == np.mean(scores[:1000] > record["threshold"])
  # Unseen normals from the held-out images' distribution: flagged at about the nominal rate.
  assert abs(out["threshold_FPR"] - 0.05) < 0.03


def test_lognormal_threshold_holds_its_nominal_rate_with_ten_held_out_images():
  """With 10 held-out normals, the empirical 0.99 quantile sits near their maximum, which an
  unseen normal exceeds with probability about 1/11; the lognormal prediction bound is exceeded
  at the nominal 1% on average (scores: lognormal, as reconstruction errors roughly are)."""
  rng = np.random.default_rng(0)
  empirical, lognormal = [], []
  unseen = np.exp(rng.normal(-2.0, 0.4, 200_000))
  for _ in range(2000):
    held = np.exp(rng.normal(-2.0, 0.4, 10))
    for method, rates in (("normal_quantile", empirical), ("lognormal", lognormal)):
      t = calibration.fit(held, np.zeros(10), method=method, quantile=0.99)["threshold"]
      rates.append(np.mean(unseen > t))
  assert np.mean(empirical) == pytest.approx(1 / 11, abs=0.01)
  assert np.mean(lognormal) == pytest.approx(0.01, abs=0.002)
  # The rate one draw realises: 19 draws in 20 under 5% against half the draws above 5%.
  assert np.quantile(lognormal, 0.95) < 0.05 < np.quantile(empirical, 0.5)


def test_lognormal_threshold_names_what_it_cannot_fit():
  with pytest.raises(ValueError, match="at least 2 normal images.*has 1"):
    calibration.fit([0.1, 5.0], [0, 1], method="lognormal")
  # Two are enough: Student's t with one degree of freedom, a bound far above both.
  two = calibration.fit([0.1, 0.2, 5.0], [0, 0, 1], method="lognormal")["threshold"]
  assert two > 1.0
  with pytest.raises(ValueError, match="positive scores; 1 of .*normal_quantile"):
    calibration.fit([0.1, -0.2, 0.3], [0, 0, 0], method="lognormal")
  c = ml_collections.ConfigDict(dict(calibration=dict(method="lognormal", quantile=0.95)))
  assert calibration.settings(c)["method"] == "lognormal"
