"""``configs/folder_pdm.py`` on a small folder of your own, through the installed ``dmad`` script.

  python experiments/folder_own_data.py [--train 50] [--order shuffled,ordered] [--draws 3] [--json]

Writes a folder in the MVTec-style layout from scikit-learn's handwritten digits (real 8x8
scans, saved as 32x32 PNG files): ``train/good`` holds ``--train`` images of the digit 1,
``test/good`` 100 more ones (``--order``: drawn at random, ``--draws`` times with seeds 0, 1, ...,
or in the data set's order) and ``test/other_digit`` 100 other digits. Then runs, as a user
would, ``dmad train`` and ``dmad eval`` with the config's full recipe (the image-mode recipe,
100 epochs of the training images, the decision threshold fitted on the 20% of ``train/good``
held out of training), and records the training plan the log states, the wall time of each
command, the metrics and the share of the normal test images the threshold flags against its
nominal rate. Two more ``dmad eval`` calls record the same share for the threshold refitted as
the empirical 0.99 quantile of the held-out scores (``--config.calibration.method=
normal_quantile``) and on the training images (``--config.calibration.split=train``). Stored:
``experiments/results/folder_own_data.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DMAD = os.path.join(os.path.dirname(sys.executable), "dmad")
OUT = os.path.join(HERE, "results", "folder_own_data.json")
N_TEST = 100  # normal and anomalous test images each (scikit-learn has 182 ones)


def write_folder(root: str, n_train: int, order: str, seed: int = 0) -> dict:
  digits = load_digits()
  images = (digits.images * (255.0 / 16.0)).astype(np.uint8)
  ones = np.flatnonzero(digits.target == 1)
  others = np.flatnonzero(digits.target != 1)
  others = np.random.default_rng(0).permutation(others)
  if order == "shuffled":
    ones = np.random.default_rng(seed).permutation(ones)
  split = {
    ("train", "good"): ones[:n_train],
    ("test", "good"): ones[n_train : n_train + N_TEST],
    ("test", "other_digit"): others[:N_TEST],
  }
  return save_split(root, images, split)


def save_split(root: str, images: np.ndarray, split: dict) -> dict:
  """Writes ``images[i]`` as ``<root>/<part>/<folder>/<i>.png`` (32x32) for every index of each
  ``(part, folder)`` of ``split``; returns the image count of each folder."""
  for (part, folder), idx in split.items():
    os.makedirs(os.path.join(root, part, folder))
    for i in idx:
      img = Image.fromarray(images[i]).resize((32, 32), Image.BILINEAR)
      img.save(os.path.join(root, part, folder, f"{i:04d}.png"))
  return {f"{p}/{f}": len(idx) for (p, f), idx in split.items()}


def run(args: list[str], cwd: str) -> tuple[float, str]:
  t0 = time.time()
  proc = subprocess.run([DMAD, *args], cwd=cwd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"dmad {args[0]} failed:\n{proc.stderr[-4000:]}")
  return time.time() - t0, proc.stdout + proc.stderr


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--train", type=int, default=50, help="training images")
  parser.add_argument(
    "--order",
    default="shuffled,ordered",
    help="how the ones are split between train/ and test/, comma-separated runs: 'shuffled' "
    "(a seeded permutation: train and test normals are exchangeable) or 'ordered' (the data "
    "set's order: the first ones train, the next ones test, as this script did before)",
  )
  parser.add_argument(
    "--recipe",
    default="released",
    choices=("released", "prototype_bank"),
    help="configs/folder_pdm.py's recipe arg; results of prototype_bank go to "
    "folder_own_data_prototype_bank.json",
  )
  parser.add_argument("--json", action="store_true", help=f"store the result in {OUT}")
  parser.add_argument(
    "--draws", type=int, default=3, help="'shuffled' folders drawn (seeds 0..draws-1)"
  )
  a = parser.parse_args()
  runs = {}
  for order in a.order.split(","):
    for seed in range(a.draws) if order == "shuffled" else (0,):
      name = f"shuffled, draw {seed}" if order == "shuffled" else order
      runs[name] = one_run(a.train, order, seed, a.recipe)
      print(name, json.dumps(runs[name]["threshold"]), flush=True)
  result = {
    "command": "python experiments/folder_own_data.py"
    + (f" --train {a.train}" if a.train != 50 else "")
    + (f" --order {a.order}" if a.order != "shuffled,ordered" else "")
    + (f" --draws {a.draws}" if a.draws != 3 else "")
    + (f" --recipe {a.recipe}" if a.recipe != "released" else ""),
    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    "runs": runs,
  }
  print(json.dumps(result, indent=2))
  if a.json:
    out = OUT if a.recipe == "released" else OUT.replace(".json", f"_{a.recipe}.json")
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


def one_run(n_train: int, order: str, seed: int, recipe: str = "released") -> dict:
  work = tempfile.mkdtemp(prefix="dmad_folder_")
  try:
    counts = write_folder(os.path.join(work, "data"), n_train, order, seed)
    config = f"{ROOT}/configs/folder_pdm.py:root={work}/data,image_size=32,channels=1"
    config += f",recipe={recipe}"
    train_s, log = run(["train", f"--config={config}", "--workdir=run"], work)
    plan = re.search(r"training plan: (.*)", log).group(1)
    eval_s, _ = run(["eval", f"--config={config}", "--workdir=run"], work)
    with open(os.path.join(work, "run", "eval", "metrics.json")) as f:
      metrics = json.load(f)
    # The named options: the same step's threshold refitted as the empirical quantile of the
    # held-out images, and on the training images.
    others = {}
    for name, option in (
      ("validation, empirical quantile", "--config.calibration.method=normal_quantile"),
      ("train", "--config.calibration.split=train"),
    ):
      run(["eval", f"--config={config}", "--workdir=run", option], work)
      with open(os.path.join(work, "run", "eval", "metrics.json")) as f:
        others[name] = json.load(f)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return {
    "folder": counts,
    "training_plan": plan,
    "train_seconds": round(train_s, 1),
    "eval_seconds": round(eval_s, 1),
    "image_AUROC": metrics["image_AUROC"],
    "image_AUROC_df": metrics["image_AUROC_df"],
    "step": metrics["step"],
    "threshold": {
      split: {
        "normal_images": m["threshold_num_normal"],
        "nominal_FPR": m["threshold_nominal_FPR"],
        "test_normal_FPR": m["threshold_FPR"],
        "test_F1": m["threshold_F1"],
      }
      for split, m in (("validation, lognormal bound (default)", metrics), *others.items())
    },
  }


if __name__ == "__main__":
  main()
