"""A detector defined in this file alone trains, evaluates, calibrates and predicts through the
package's public entry points: the interface of dmad_jax.models.base is all a model needs."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dmad_jax import models
from dmad_jax.configs import schema
from dmad_jax.evaluation import calibration, job
from dmad_jax.models import base
from dmad_jax.predict import Predictor
from dmad_jax.train import train_and_evaluate

SIZE = 16


@models.register("test_centred_filter")
class CentredFilter(base.Detector):
  """x_hat = center + conv3x3(x - center): a filter around the training images' median image.

  Exercises every hook: a config section, a value from the training data (the median image),
  statistics of the training split (the range of the raw error, which scales the main score)
  and its own score and map names.
  """

  config_sections = {"model": {"width": 3}}
  figure_rows = ("input", "reconstruction")
  pixel_map = "error"
  score_names = ("score", "raw", "brightness")

  def __init__(self, config):
    super().__init__(config)
    self.width = int(self.section("model")["width"])

  def init(self, rng, batch):
    c = batch["image"].shape[-1]
    w = 0.1 * jax.random.normal(rng, (self.width, self.width, c, c), jnp.float32)
    return {
      "params": {"w": w, "center": jnp.zeros(batch["image"].shape[1:], jnp.float32)},
      "batch_stats": {
        base.STATISTICS: {
          "raw_min": jnp.zeros(()),
          "raw_max": jnp.ones(()),
          "calibrated": jnp.zeros(()),
        }
      },
    }

  def _reconstruct(self, params, x):
    y = jax.lax.conv_general_dilated(
      x - params["center"], params["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return params["center"] + y

  def loss(self, params, batch_stats, batch, rng):
    del rng
    x = batch["image"]
    mse = jnp.mean((self._reconstruct(params, x) - x) ** 2)
    return mse, ({"mse": mse}, batch_stats)

  def _raw(self, params, x):
    error = jnp.mean((self._reconstruct(params, x) - x) ** 2, axis=-1)
    return error, jnp.mean(error, axis=(1, 2))

  def statistics(self, variables, batch):
    _, raw = self._raw(variables["params"], batch["image"])
    return {"raw_min": raw, "raw_max": raw}

  def predict(self, variables, batch):
    x = batch["image"]
    error, raw = self._raw(variables["params"], x)
    stats = variables["batch_stats"][base.STATISTICS]
    return base.Prediction(
      scores={
        "score": base.min_max_scale(raw, stats["raw_min"], stats["raw_max"]),
        "raw": raw,
        "brightness": jnp.mean(x, axis=(1, 2, 3)),
      },
      maps={"error": error},
      images={"input": x, "reconstruction": self._reconstruct(variables["params"], x)},
    )

  def data_init(self):
    return base.MedianImage(max_items=100)

  def apply_data_init(self, params, value):
    return {**params, "center": jnp.asarray(value)}


def _write_folder(root):
  """Smooth blobs are normal; a bright square is a defect, with its ground-truth mask."""
  rng = np.random.default_rng(0)

  def blob():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.uniform(6, 10, 2)
    return 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20.0)

  for split, folder, n in (("train", "good", 12), ("test", "good", 4), ("test", "square", 4)):
    (root / split / folder).mkdir(parents=True)
    for i in range(n):
      img = blob()
      if folder == "square":
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[4:9, 5:10] = 255
        img[mask > 0] = 255
        (root / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "ground_truth" / folder / f"{i:03d}_mask.png")
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        root / split / folder / f"{i:03d}.png"
      )


def _config(root):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = "test_centred_filter"
  c.data = dict(name="folder", root=str(root), image_size=SIZE, channels=1)
  c.model = dict(width=3)
  c.optimizer = dict(name="adam", lr=1e-2, b1=0.9, b2=0.999, schedule="constant")
  c.batch_size = 4
  c.total_epochs = 2  # 12 training images: 6 steps
  c.log_every_steps = 1
  c.checkpoint_every_epochs = 1
  c.eval = dict(batch_size=8, figure_samples=2)
  c.calibration = dict(method="normal_quantile", split="train", quantile=0.9)
  return c


def test_a_detector_defined_here_trains_evaluates_calibrates_and_predicts(tmp_path):
  root = tmp_path / "data"
  _write_folder(root)
  config, workdir = _config(root), str(tmp_path / "run")
  assert "test_centred_filter" in models.names()

  state = train_and_evaluate(config, workdir)
  assert int(state.step) == 6  # 2 epochs of 12 images in batches of 4
  with open(os.path.join(workdir, "plan.json")) as f:
    assert json.load(f)["total_steps"] == 6
  # The median of the training images was put in place, then trained; the statistics of the
  # training split were fitted and saved.
  assert float(state.batch_stats[base.STATISTICS]["calibrated"]) == 1.0

  result = job.evaluate(config, workdir)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    written = json.load(f)
  for key in ("image_AUROC", "image_AUROC_raw", "image_AUROC_brightness", "pixel_AUROC"):
    assert 0.0 <= written[key] <= 1.0, key
  assert written["pixel_map"] == "error" and written["image_AUROC_brightness"] == 1.0
  assert "threshold" in written and os.path.exists(result["panel"])
  assert os.path.exists(result["heatmaps"])

  record = calibration.calibrate(config, workdir)
  assert record["pixel_map"] == "error" and record["num_images"] == 12

  predictor = Predictor.from_workdir(workdir)
  paths = sorted(str(p) for p in (root / "test" / "square").iterdir())
  out = predictor.predict_files(paths)
  scores = np.load(os.path.join(workdir, "eval", "scores_6.npz"))
  # The predictor's scores are the eval job's for the same images (the defect images are the
  # last four records of the test split).
  order = np.argsort(scores["index"])
  np.testing.assert_allclose(out["scores"]["raw"], scores["raw"][order][-4:], rtol=1e-6)
  assert out["map"].shape == (4, SIZE, SIZE) and out["is_anomalous"].dtype == bool


def test_registry_and_config_errors_name_the_closest_known():
  assert {"pdm", "ppdm", "rd", "daad", "daad_plus"} <= set(models.names())
  with pytest.raises(schema.ConfigError, match="did you mean 'test_centred_filter'"):
    models.get_detector(ml_collections.ConfigDict({"model_name": "test_centred_filtr"}))
  c = ml_collections.ConfigDict({"model_name": "test_centred_filter", "model": {"widht": 3}})
  with pytest.raises(schema.ConfigError, match=r"config.model.widht \(did you mean 'width'\?\)"):
    models.get_detector(c)
  with pytest.raises(ValueError, match="already registered"):
    models.register("pdm")(CentredFilter)
