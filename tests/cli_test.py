"""`dmad train` / `dmad eval` (via python -m dmad_jax) on a folder dataset written by the test."""

import json
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_folder(root, rng):
  """A tiny MVTec-style set: blobs are normal, blobs with a bright square are defects."""

  def blob(defect):
    yy, xx = np.mgrid[:32, :32]
    cy, cx = rng.uniform(12, 20, 2)
    img = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
    if defect:
      y, x = rng.integers(2, 24, 2)
      img[y : y + 6, x : x + 6] = 255
    return np.clip(img, 0, 255).astype(np.uint8)

  for split, folder, n, defect in [
    ("train", "good", 24, False),
    ("test", "good", 6, False),
    ("test", "scratch", 5, True),
  ]:
    d = root / split / folder
    d.mkdir(parents=True)
    for i in range(n):
      g = blob(defect)
      img = Image.fromarray(np.stack([g, g, g], -1)) if i % 2 else Image.fromarray(g)  # RGB+gray
      img.save(d / f"{i:03d}.png")


@pytest.mark.slow
def test_train_and_eval_commands_on_a_folder_dataset(tmp_path, dmad_cli):
  _write_folder(tmp_path / "data", np.random.default_rng(0))
  cfg = f"{ROOT}/configs/folder_pdm.py:root={tmp_path / 'data'},image_size=32,runlocal"
  work = str(tmp_path / "run")
  train = dmad_cli(
    "train", f"--config={cfg}", f"--workdir={work}", "--config.total_steps=3", cwd=ROOT
  )
  assert train.returncode == 0, train.stderr[-3000:]
  ev = dmad_cli("eval", f"--config={cfg}", f"--workdir={work}", "--config.total_steps=3", cwd=ROOT)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert "metrics:" in ev.stdout and "figures:" in ev.stdout
  with open(os.path.join(work, "eval", "metrics.json")) as f:
    m = json.load(f)
  assert (m["step"], m["num_normal"], m["num_anomalous"]) == (3, 6, 5)


def test_cli_usage_errors(tmp_path, dmad_cli):
  bad = dmad_cli("fly", f"--config={ROOT}/configs/digits_pdm.py:runlocal", "--workdir=x", cwd=ROOT)
  assert bad.returncode != 0 and "usage: dmad {train|eval|video-auc}" in bad.stderr
  unknown = dmad_cli(
    "train",
    f"--config={ROOT}/configs/digits_pdm.py:runlocal",
    "--workdir=x",
    "--config.no_such_key=1",
    cwd=tmp_path,
  )
  assert unknown.returncode != 0 and "no_such_key" in unknown.stderr
