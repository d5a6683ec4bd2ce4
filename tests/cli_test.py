"""The installed ``dmad`` script, run as a user runs it: from a directory outside the repository,
with relative and absolute config paths, on a folder data set written by the test."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dmad_jax.configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The console script pip installed next to this interpreter (what `make` puts in .venv/bin).
DMAD = os.path.join(os.path.dirname(sys.executable), "dmad")
CONFIG_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def dmad(*args, cwd, timeout=600, user_flags=False, pythonpath=None):
  """Runs the installed script with the environment a user has: no PYTHONPATH (``pythonpath``:
  this one); with ``user_flags``, also XLA's default flags rather than the suite's
  (conftest.SUITE_XLA_FLAGS: -O0, the older fusion emitters)."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  if pythonpath is not None:
    env["PYTHONPATH"] = str(pythonpath)
  if user_flags:
    flags = env.get("XLA_FLAGS", "").split()
    suite = ("xla_backend_optimization_level", "xla_cpu_use_fusion_emitters")
    env["XLA_FLAGS"] = " ".join(f for f in flags if not any(name in f for name in suite))
  return subprocess.run(
    [DMAD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


def _write_folder(root, rng, n_train=24):
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
    ("train", "good", n_train, False),
    ("test", "good", 6, False),
    ("test", "scratch", 5, True),
  ]:
    d = root / split / folder
    d.mkdir(parents=True)
    for i in range(n):
      g = blob(defect)
      img = Image.fromarray(np.stack([g, g, g], -1)) if i % 2 else Image.fromarray(g)  # RGB+gray
      img.save(d / f"{i:03d}.png")


def _frame_dump(root):
  """The frame-dump layout with two scenes (ShanghaiTech's config counts its templates)."""
  for split, videos in (("training", ("01_001", "02_001")), ("testing", ("01_0014",))):
    for video in videos:
      os.makedirs(root / split / "frames" / video)


# Per config: an arg that makes it complete (None: it needs none), and the arg its message asks
# for when it is missing.
def _complete_arg(name, tmp_path):
  frames = tmp_path / "frames"
  _frame_dump(frames)
  return {
    "digits_pdm.py": None,
    "digits_daad.py": None,
    "folder_pdm.py": "root=/data/x,image_size=32",
    "folder_daad.py": "root=/data/x",
    "mvtec_daad.py": "root=/data/mvtec;category=bottle",
    "mvtec_ppdm.py": "root=/data/mvtec;category=bottle;weights=w.npz",
    "mvtec_rd.py": "root=/data/mvtec;category=bottle;weights=w.npz",
    "ped2_pdm.py": "root=/data/ped2",
    "avenue_pdm.py": "root=/data/avenue",
    "shanghai_pdm.py": f"root={frames}",
    "digits_igd.py": None,
    "folder_igd.py": "root=/data/x;weights=r18.npz",
    "mvtec_igd.py": "root=/data/mvtec;category=bottle;weights=r18.npz",
    "mvtec_igd_kd.py": "root=/data/mvtec;category=bottle;weights=r18.npz",
    "oneclass_igd.py": "dataset=mnist;normal=3",
    "oneclass_rd.py": "dataset=mnist;normal=3;weights=r34.npz",
    "oneclass_ard.py": "dataset=cifar10;normal=0;weights=r34.npz",
    "oneclass_ppdm.py": "dataset=fashion_mnist;normal=0;weights=w.npz",
    "oneclass_daad.py": "dataset=mnist;normal=3",
    "dagm_rd.py": "root=/data/dagm;class=1;weights=w.npz",
    "dagm_ard.py": "root=/data/dagm;class=1;weights=w.npz",
    "ped2_mnad.py": "root=/data/ped2",
    "avenue_mnad.py": "root=/data/avenue",
    "shanghai_mnad.py": "root=/data/shanghai",
    "ped2_daad.py": "root=/data/ped2",
    "avenue_daad.py": "root=/data/avenue",
  }[name]


def test_every_config_is_known_to_this_test():
  names = {
    "digits_pdm.py",
    "digits_daad.py",
    "folder_pdm.py",
    "folder_daad.py",
    "mvtec_daad.py",
    "mvtec_ppdm.py",
    "mvtec_rd.py",
    "ped2_pdm.py",
    "avenue_pdm.py",
    "shanghai_pdm.py",
    "digits_igd.py",
    "folder_igd.py",
    "mvtec_igd.py",
    "mvtec_igd_kd.py",
    "oneclass_igd.py",
    "oneclass_rd.py",
    "oneclass_ard.py",
    "oneclass_ppdm.py",
    "oneclass_daad.py",
    "dagm_rd.py",
    "dagm_ard.py",
    "ped2_mnad.py",
    "avenue_mnad.py",
    "shanghai_mnad.py",
    "ped2_daad.py",
    "avenue_daad.py",
  }
  assert set(CONFIG_FILES) == names, "a new config file: add its complete arg to this test"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_loads_through_the_installed_script(name, tmp_path):
  elsewhere = tmp_path / "cwd"
  elsewhere.mkdir()
  arg = _complete_arg(name, tmp_path)
  spec = "" if arg is None else f":{arg}"
  # Absolute path from a directory outside the repository, relative path from the repository.
  for cwd, path in ((elsewhere, os.path.join(ROOT, "configs", name)), (ROOT, f"configs/{name}")):
    out = dmad("config", f"--config={path}{spec}", cwd=cwd)
    assert out.returncode == 0, (cwd, out.stderr[-3000:])
    config = json.loads(out.stdout)
    assert config["model_name"] in (
      "pdm", "daad", "daad_plus", "ppdm", "rd", "ard", "igd", "igd_kd", "mnad"
    )  # fmt: skip
    # Every key the eval job reads is in the section, so each can be set on the command line.
    assert set(config["eval"]) >= set(common.EVAL_DEFAULTS), sorted(config["eval"])
  if arg is not None:
    # Without its required arg the config says which arg to pass, in its own words.
    missing = dmad("config", f"--config={os.path.join(ROOT, 'configs', name)}", cwd=elsewhere)
    assert missing.returncode != 0
    assert f"configs/{name} needs the config arg" in missing.stderr, missing.stderr[-2000:]
    assert "--config configs/" in missing.stderr
    assert "ModuleNotFoundError" not in missing.stderr and "ImportError" not in missing.stderr


def test_help_lists_the_commands(tmp_path):
  for args in (("--help",), ("train", "--help")):
    out = dmad(*args, cwd=tmp_path)
    text = out.stdout + out.stderr  # (absl's --help exits with status 1)
    assert "dmad train " in text and "--config FILE[:ARG] --workdir DIR" in text, text[-2000:]
    assert "dmad predict" in text and "dmad export" in text and "--helpfull" in text


def test_an_eval_setting_that_a_config_docstring_names_is_accepted_on_the_command_line():
  # configs/ped2_pdm.py documents --config.eval.test_selected=True (dmad locks the config, so a
  # key missing from the section was refused with a KeyError).
  flag = "--config.eval.test_selected=True"
  out = dmad("config", "--config=configs/ped2_pdm.py:root=/data/ped2", flag, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout)["eval"]["test_selected"] is True


@pytest.mark.slow
def test_train_eval_predict_of_folder_pdm_through_the_installed_script(tmp_path):
  """The README's own-data commands, from a directory outside the repository, with the user's
  XLA flags."""
  _write_folder(tmp_path / "data", np.random.default_rng(0))
  elsewhere = tmp_path / "cwd"
  elsewhere.mkdir()
  cfg = f"{ROOT}/configs/folder_pdm.py:root={tmp_path / 'data'},image_size=32,runlocal"
  train = dmad(
    "train",
    f"--config={cfg}",
    "--workdir=run",
    "--config.total_steps=3",
    cwd=elsewhere,
    user_flags=True,
  )
  assert train.returncode == 0, train.stderr[-3000:]
  assert "checkpoints:" in train.stdout
  ev = dmad(
    "eval",
    f"--config={cfg}",
    "--workdir=run",
    "--config.total_steps=3",
    "--config.eval.baselines=True",
    cwd=elsewhere,
    user_flags=True,
  )
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert "metrics:" in ev.stdout and "figures:" in ev.stdout
  # The model against the classical detectors of the same run, and the deformation alone.
  line = next(x for x in ev.stdout.splitlines() if x.startswith("image AUROC"))
  assert "against the best classical detector of this run (" in line
  assert "deformation alone" in line
  with open(elsewhere / "run" / "eval" / "metrics.json") as f:
    m = json.load(f)
  assert (m["step"], m["num_normal"], m["num_anomalous"]) == (3, 6, 5)
  assert 0.0 <= m["image_AUROC"] <= 1.0
  # folder_pdm calibrates on the 20% of train/good (5 of 24) held out of training, and the eval
  # output states the share of the test normals that its threshold flags.
  assert (m["threshold_split"], m["threshold_num_normal"]) == ("validation", 5)
  assert "5 of the 24 images of train/good held out" in train.stderr
  flagged = 100 * m["threshold_FPR"]
  assert f"flags {flagged:.1f}% of the test split's normal images (nominal 1.0%)" in ev.stdout
  new = sorted(glob.glob(str(tmp_path / "data" / "test" / "scratch" / "*.png")))[:2]
  pred = dmad("predict", "--workdir=run", *new, "--out=pred", cwd=elsewhere, user_flags=True)
  assert pred.returncode == 0, pred.stderr[-3000:]
  with open(elsewhere / "pred" / "predictions.json") as f:
    rows = json.load(f)["images"]
  assert [r["path"] for r in rows] == new
  assert all(os.path.isfile(elsewhere / r["heatmap"]) for r in rows)

  # The step as one file, run where Flax cannot be imported (a `flax` package that raises
  # first on the path): the eval job's scores to 1e-5 and its decisions, on every test image.
  exp = dmad("export", "--workdir=run", "--out=model.dmad", cwd=elsewhere, user_flags=True)
  assert exp.returncode == 0, exp.stderr[-3000:]
  assert "exported step 3" in exp.stdout
  (tmp_path / "noflax" / "flax").mkdir(parents=True)
  (tmp_path / "noflax" / "flax" / "__init__.py").write_text(
    "raise ImportError('flax is not installed here')\n"
  )
  with np.load(elsewhere / "run" / "eval" / "scores_3.npz") as f:
    saved = {k: f[k] for k in f.files}
  tests = sorted(glob.glob(str(tmp_path / "data" / "test" / "*" / "*.png")))
  assert len(tests) == len(saved["score"]) == 11
  run = dmad(
    "predict",
    "--exported=model.dmad",
    *tests,
    "--out=pred_exported",
    cwd=elsewhere,
    user_flags=True,
    pythonpath=tmp_path / "noflax",
  )
  assert run.returncode == 0, run.stderr[-3000:]
  with open(elsewhere / "pred_exported" / "predictions.json") as f:
    rows = json.load(f)["images"]
  # The eval job's records are the test split in sorted order (good, then scratch), as `tests`.
  np.testing.assert_allclose(
    [r["score"] for r in rows], saved["score"][np.argsort(saved["index"])], rtol=1e-5, atol=1e-5
  )
  threshold = m["threshold"]
  assert [r["is_anomalous"] for r in rows] == [
    bool(x) for x in saved["score"][np.argsort(saved["index"])] > threshold
  ]


def test_usage_lists_every_command(tmp_path):
  from dmad_jax import main

  for args in ((), ("fly",)):
    out = dmad(*args, cwd=tmp_path)
    assert out.returncode != 0
    for command in main.COMMANDS:
      assert f"dmad {command} " in out.stderr, (command, out.stderr[-2000:])
  assert "unknown command 'fly'" in dmad("fly", cwd=tmp_path).stderr
  unknown = dmad(
    "train",
    f"--config={ROOT}/configs/digits_pdm.py:runlocal",
    "--workdir=x",
    "--config.no_such_key=1",
    cwd=tmp_path,
  )
  assert unknown.returncode != 0 and "no_such_key" in unknown.stderr


def test_extract_frames_command(tmp_path):
  import importlib.util

  out = dmad("extract-frames", "in.avi", "frames", cwd=tmp_path)
  assert out.returncode != 0
  if importlib.util.find_spec("cv2") is None:  # OpenCV is not a dependency of dmad_jax
    assert "pip install opencv-python-headless" in out.stderr, out.stderr[-2000:]
  else:
    assert "in.avi' does not exist" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_train_eval_predict_of_igd_through_the_installed_script(tmp_path):
  """A model added as one model file plus configs runs through the same three commands: IGD's
  local model on 32x32 images (one patch each), with its E-step before the step."""
  _write_folder(tmp_path / "data", np.random.default_rng(1))
  data = tmp_path / "data"
  cfg = f"{ROOT}/configs/folder_igd.py:root={data};variant=local;image_size=32;runlocal"
  common = (f"--config={cfg}", "--workdir=run", "--config.total_steps=1")
  train = dmad("train", *common, cwd=tmp_path)
  assert train.returncode == 0, train.stderr[-3000:]
  assert "refit every 1" in train.stderr  # the training plan names the E-step schedule
  ev = dmad("eval", *common, cwd=tmp_path)
  assert ev.returncode == 0, ev.stderr[-3000:]
  with open(tmp_path / "run" / "eval" / "metrics.json") as f:
    m = json.load(f)
  assert (m["step"], m["num_normal"], m["num_anomalous"]) == (1, 6, 5)
  for key in ("image_AUROC", "image_AUROC_recon", "image_AUROC_gsvdd"):
    assert 0.0 <= m[key] <= 1.0, (key, m)
  assert "pixel_AUROC" not in m and "threshold" in m  # no masks in this folder; calibrated
  new = sorted(glob.glob(str(tmp_path / "data" / "test" / "scratch" / "*.png")))[:2]
  pred = dmad("predict", "--workdir=run", *new, "--out=pred", cwd=tmp_path)
  assert pred.returncode == 0, pred.stderr[-3000:]
  with open(tmp_path / "pred" / "predictions.json") as f:
    rows = json.load(f)["images"]
  assert [r["path"] for r in rows] == new
  assert all(os.path.isfile(tmp_path / r["heatmap"]) for r in rows)
