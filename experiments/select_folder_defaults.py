"""Chooses the recipe of ``configs/folder_pdm.py`` on labelled validation folders only.

  python experiments/select_folder_defaults.py [--draws 2] [--candidates released,...] [--json]

A user's folder may carry a labelled ``validation/`` folder in the test layout; this script
builds such folders from scikit-learn's handwritten digits, the way
``experiments/folder_own_data.py`` builds its folders (real 8x8 scans saved as 32x32 PNG files,
normal = the digit 1): ``train/good`` 50 ones, ``validation/good`` the 32 ones left over by the
test split and ``validation/other_digit`` 32 other digits (none of them in the test split). Each
candidate of :data:`CANDIDATES` (``configs/folder_pdm.py`` with an arg string and config
overrides: the released recipe, and the image-mode recipe with banks of 8 to 64 codes) is
trained from scratch on every draw (``--draws`` seeded permutations of the ones) and scored on
the validation split by the eval job with each score variant that applies to it. The candidate
and score with the highest mean validation image AUROC over the draws are chosen; the test
split is not read. Writes ``experiments/results/folder_selection.json`` with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from folder_own_data import save_split  # this folder: the same PNG layout
from sklearn.datasets import load_digits

from dmad_jax.configs import load
from dmad_jax.evaluation import job
from dmad_jax.train import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "folder_selection.json")
N_TRAIN, N_TEST, N_VALIDATION = 50, 100, 32  # scikit-learn has 182 ones

# name -> (configs/folder_pdm.py arg additions, config overrides)
CANDIDATES = {
  "released": ("recipe=released", {}),
  "prototype_bank_codes64": ("recipe=prototype_bank", {}),
  "prototype_bank_codes16": ("recipe=prototype_bank", {"model.num_codes": 16}),
  "prototype_bank_codes8": ("recipe=prototype_bank", {"model.num_codes": 8}),
}
# Score variants: each candidate's own score, and for the image-mode recipe the best fitting of
# an image's nearest P prototypes (P up to the bank size).
PROTOTYPES = (1, 8, 32)


def write_folder(root: str, seed: int) -> dict:
  """train/good, test/{good,other_digit} as experiments/folder_own_data.py writes them for
  draw ``seed``, plus a labelled validation/ folder of the images neither uses."""
  digits = load_digits()
  images = (digits.images * (255.0 / 16.0)).astype(np.uint8)
  ones = np.random.default_rng(seed).permutation(np.flatnonzero(digits.target == 1))
  others = np.random.default_rng(0).permutation(np.flatnonzero(digits.target != 1))
  split = {
    ("train", "good"): ones[:N_TRAIN],
    ("test", "good"): ones[N_TRAIN : N_TRAIN + N_TEST],
    ("test", "other_digit"): others[:N_TEST],
    ("validation", "good"): ones[N_TRAIN + N_TEST : N_TRAIN + N_TEST + N_VALIDATION],
    ("validation", "other_digit"): others[N_TEST : N_TEST + N_VALIDATION],
  }
  return save_split(root, images, split)


def _config(root: str, name: str, **extra):
  arg, overrides = CANDIDATES[name]
  config = load(
    os.path.join(ROOT, "configs", "folder_pdm.py"), f"root={root},image_size=32,channels=1,{arg}"
  )
  for key, value in {**overrides, **extra}.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


def score_variants(config) -> dict[str, dict]:
  if not config.model.global_code:
    return {"own": {}}  # the released recipe's own score
  return {f"p{p}": {"score.prototypes": p} for p in PROTOTYPES if p <= config.model.num_codes}


def run_candidate(name: str, root: str, workdir: str) -> dict:
  # Training does not read the score; the score variants are set for each evaluation.
  config = _config(root, name, **{"score.prototypes": 1})
  t0 = time.time()
  train_and_evaluate(config, workdir)
  out = {"train_seconds": round(time.time() - t0, 1), "validation": {}}
  for variant, extra in score_variants(config).items():
    result = job.evaluate(_config(root, name, **{"eval.split": "validation", **extra}), workdir)
    out["validation"][variant] = {
      "image_AUROC": result["image_AUROC"],
      "image_AUROC_df": result["image_AUROC_df"],
      "num_normal": result["num_normal"],
      "num_anomalous": result["num_anomalous"],
    }
  return out


def _prototypes(variant: str) -> int:
  return int(variant[1:]) if variant.startswith("p") else 1


def choose(runs: dict) -> dict:
  """The candidate and score variant with the highest mean validation AUROC over the draws; on
  a tie the one listed first in :data:`CANDIDATES` (the released recipe first), then the one
  with fewer prototypes scored."""
  means = {}
  for name, draws in runs.items():
    for variant in next(iter(draws.values()))["validation"]:
      aurocs = [d["validation"][variant]["image_AUROC"] for d in draws.values()]
      means[(name, variant)] = float(np.mean(aurocs))
  order = list(CANDIDATES)
  (name, variant), best = max(
    means.items(),
    key=lambda kv: (kv[1], -order.index(kv[0][0]), -_prototypes(kv[0][1])),
  )
  return {
    "candidate": name,
    "score": variant,
    "mean_validation_image_AUROC": best,
    "means": {f"{n}, {v}": m for (n, v), m in sorted(means.items())},
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--candidates", default=",".join(CANDIDATES))
  parser.add_argument("--draws", type=int, default=2, help="seeded folders (seeds 0..draws-1)")
  parser.add_argument("--json", action="store_true", help=f"store the result in {OUT}")
  a = parser.parse_args()
  names = a.candidates.split(",")
  unknown = sorted(set(names) - set(CANDIDATES))
  if unknown:
    raise SystemExit(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  work = tempfile.mkdtemp(prefix="dmad_folder_selection_")
  jax.config.update("jax_compilation_cache_dir", os.path.join(work, "jax_cache"))
  runs: dict = {name: {} for name in names}
  folders = {}
  try:
    for seed in range(a.draws):
      root = os.path.join(work, f"data{seed}")
      folders[f"draw {seed}"] = write_folder(root, seed)
      for name in names:
        workdir = os.path.join(work, f"{name}_{seed}")
        runs[name][f"draw {seed}"] = run_candidate(name, root, workdir)
        print(name, seed, json.dumps(runs[name][f"draw {seed}"]), flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  result = {
    "command": " ".join(["python", "experiments/select_folder_defaults.py", *sys.argv[1:]]),
    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    "folders": folders,
    "candidates": {
      name: {"arg": CANDIDATES[name][0], "overrides": CANDIDATES[name][1], "draws": runs[name]}
      for name in names
    },
    "chosen": choose(runs),
  }
  print(json.dumps(result["chosen"], indent=2))
  if a.json:
    with open(OUT, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
