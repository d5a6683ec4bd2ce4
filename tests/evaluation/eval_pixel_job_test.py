"""Pixel metrics and heatmaps in the eval job, end to end on a tiny MVTec-layout folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from dmad_jax.configs import load_module
from dmad_jax.data import FolderSource
from dmad_jax.evaluation import job
from dmad_jax.evaluation.figures import heatmap_overlays
from dmad_jax.evaluation.metrics import aupro, aupro_rd4ad, pixel_auroc, pixel_auroc_per_image
from dmad_jax.train import trainer

CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
folder_pdm = load_module(os.path.join(CONFIGS, "folder_pdm.py"))

SIZE = 32


def _write_mvtec(root, rng):
  """Gaussian blobs (gray and RGB files); defects are faint squares with their masks."""
  yy, xx = np.mgrid[:SIZE, :SIZE]

  def blob():
    cy, cx = rng.uniform(12, 20, 2)
    return 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)

  for split, folder, n in [("train", "good", 8), ("test", "good", 3), ("test", "scratch", 4)]:
    (root / split / folder).mkdir(parents=True)
    for i in range(n):
      img = blob()
      if folder == "scratch":
        mask = np.zeros((SIZE, SIZE), np.uint8)
        for _ in range(2):  # Two squares, usually two regions.
          y, x = rng.integers(2, 26, 2)
          mask[y : y + 5, x : x + 5] = 255
        img[mask > 0] += 40  # Faint, so the pixel metrics of an untrained model are not 1.
        (root / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "ground_truth" / folder / f"{i:03d}_mask.png")
      img = np.clip(img, 0, 255).astype(np.uint8)
      pil = Image.fromarray(np.stack([img] * 3, -1)) if i % 2 else Image.fromarray(img)
      pil.save(root / split / folder / f"{i:03d}.png")


@pytest.mark.slow  # ~50 s of CPU, nearly all of it compiling the PDM train step.
def test_eval_job_reports_pixel_metrics_of_the_saved_maps(tmp_path):
  _write_mvtec(tmp_path / "data", np.random.default_rng(0))
  config = folder_pdm.get_config(f"root={tmp_path / 'data'},image_size={SIZE},runlocal")
  with config.unlocked():
    config.total_steps = 2
    config.eval.batch_size = 4  # 7 test images: the last batch is padded.
    config.eval.save_pixel_maps = True
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  result = job.evaluate(config, workdir)

  out = os.path.join(workdir, "eval")
  with open(os.path.join(out, "metrics.json")) as f:
    written = json.load(f)
  assert written["pixel_map"] == "rec"
  saved = np.load(os.path.join(out, "pixel_maps_2.npz"))
  maps, masks, index = saved["maps"], saved["masks"], saved["index"]
  assert maps.shape == masks.shape == (7, SIZE, SIZE) and maps.dtype == np.float32
  np.testing.assert_array_equal(index, np.load(os.path.join(out, "scores_2.npz"))["index"])
  # The saved masks are the source's, record by record; padded rows were dropped.
  test = FolderSource(tmp_path / "data", "test", image_size=SIZE)
  np.testing.assert_array_equal(masks, np.stack([test[int(i)]["mask"] > 0.5 for i in index]))
  expected = {
    "pixel_AUROC": pixel_auroc(maps, masks),
    "pixel_AUROC_per_image": pixel_auroc_per_image(maps, masks),
    "pixel_AUPRO": aupro(maps, masks, 0.3),
  }
  try:
    expected["pixel_AUPRO_rd4ad"] = aupro_rd4ad(maps, masks, 0.3)
  except ValueError:
    # RD4AD's variant is undefined on an image whose map keeps too few thresholds (an
    # untrained model's squared error can): the job leaves it out with a warning, not fails.
    assert "pixel_AUPRO_rd4ad" not in written and "pixel_AUPRO_rd4ad" not in result
  assert 0.0 < written["pixel_AUROC"] < 1.0  # an untrained model: neither perfect nor nothing
  for key, value in expected.items():
    assert 0.0 <= written[key] <= 1.0
    assert written[key] == pytest.approx(value, abs=1e-12) == result[key]
  assert os.path.getsize(os.path.join(out, "heatmaps_2.png")) > 0
  assert result["heatmaps"] == os.path.join(out, "heatmaps_2.png")


def test_heatmap_overlays_checks_shapes(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3, 16, 16, 3))
  masks = np.zeros((3, 16, 16))
  masks[1, 4:9, 4:9] = 1
  maps = masks + rng.normal(0, 0.2, masks.shape)
  maps[2, 0, 0] = np.nan  # Left blank, not an error.
  path = heatmap_overlays(
    tmp_path / "h.png", images, maps, masks, scores=[1, 2, 3], labels=[0, 1, 0]
  )
  with Image.open(path) as img:
    assert img.format == "PNG" and img.size[0] > img.size[1]
  with pytest.raises(ValueError, match=r"masks must have shape \(3, 16, 16\)"):
    heatmap_overlays(tmp_path / "x.png", images, maps, masks[:, :8])
  with pytest.raises(ValueError, match="labels has 2 entries, expected 3"):
    heatmap_overlays(tmp_path / "x.png", images, maps, masks, labels=[0, 1])
