"""The demo protocol (odd digits normal) on other random splits of the same 1797 scans.

  python experiments/digits_split_seeds.py [--seeds 0,1,2,3,4] [--candidate NAME] [--reuse] \
      [--json]

``make demo`` evaluates one stratified split (``config.data.seed = 0``), the one whose validation
part chose the image-mode recipe (experiments/select_digits_defaults.py). This script trains the
unchanged configs/digits_pdm.py on the split of each ``--seeds`` value (train, validation and
test parts all redrawn; the model's initialisation stays ``config.seed``) and evaluates it with
the classical detectors fitted on the same training images, so that a difference between the
model and k-NN on one split can be read against how much it moves from split to split. Splits
other than 0 were never seen by the selection.

Each run also records the validation AUROC of every score variant the selection compares over
the five splits (``FIVE_SPLIT_SCORES`` of experiments/select_digits_defaults.py) and, for every
anomalous digit, the AUROC of it against the test normals by
the model's score (the eval job's stored per-image scores) and by k-NN, which shows where the
model loses, and the validation AUROCs of the same run (model and baselines), on which
settings may be compared over five splits instead of one. ``--candidate NAME`` trains a
candidate of experiments/select_digits_defaults.py instead (its overrides, scored with the demo
config's score) into ``--workroot``/NAME. ``--reuse`` reads the runs already trained instead of
training.

Writes ``experiments/results/digits_split_seeds.json`` (``digits_split_seeds_NAME.json`` for a
candidate) with ``--json`` (every run's metrics,
the per-digit AUROCs, the per-split difference to each baseline, their means and the machine)
and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time

import jax
import numpy as np
from sklearn.metrics import roc_auc_score

from dmad_jax import data as data_lib
from dmad_jax.configs import load
from dmad_jax.evaluation import baselines, job
from dmad_jax.train import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "digits_split_seeds.json")
BASELINES = ("knn", "kde", "pca", "ocsvm", "iforest")


def per_digit(config, workdir: str, step: int) -> dict:
  """AUROC of each anomalous digit against the test normals: the model's stored per-image
  scores (``eval/scores_<step>.npz``) and k-NN refitted on the same training images."""
  test = data_lib.get_source(config.data, "test")
  train = data_lib.get_source(config.data, "train")
  stored = np.load(os.path.join(job.output_dir(workdir), f"scores_{step}.npz"))
  model = np.empty(len(test))
  model[stored["index"]] = stored["score"]
  knn = baselines.scores(baselines.split_images(train), baselines.split_images(test), ("knn",))
  digits, labels = test.digits, np.asarray([test[i]["label"] for i in range(len(test))])
  out = {}
  for digit in sorted(set(digits[labels == 1].tolist())):
    keep = (labels == 0) | (digits == digit)
    out[str(digit)] = {
      name: float(roc_auc_score(labels[keep], s[keep]))
      for name, s in (("model", model), ("knn", knn["knn"]))
    }
  return out


def _selection():
  """experiments/select_digits_defaults.py as a module (its candidates and score variants)."""
  spec = importlib.util.spec_from_file_location(
    "select_digits_defaults", os.path.join(HERE, "select_digits_defaults.py")
  )
  selection = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(selection)
  return selection


def candidate_config(name: str | None):
  """configs/digits_pdm.py, or the named candidate of experiments/select_digits_defaults.py
  with the demo config's score."""
  config = load(os.path.join(ROOT, "configs", "digits_pdm.py"))
  if name is None:
    return config
  selection = _selection()
  if name not in selection.CANDIDATES:
    raise SystemExit(f"unknown candidate {name!r}; known: {', '.join(selection.CANDIDATES)}")
  candidate = selection._config(selection.CANDIDATES[name])
  candidate.score = config.score
  return candidate


def run(seed: int, workroot: str, reuse: bool = False, candidate: str | None = None) -> dict:
  """Trains (unless ``reuse``) and evaluates configs/digits_pdm.py (or ``candidate``) on the
  split drawn with ``seed``; the test split, then the validation split."""
  config = candidate_config(candidate)
  config.data.seed = seed
  workdir = os.path.join(workroot, f"split_{seed}")
  t0 = time.time()
  if not reuse:
    shutil.rmtree(workdir, ignore_errors=True)
    train_and_evaluate(config, workdir)
  result = job.evaluate(config, workdir)
  keep = {k: v for k, v in result.items() if "AUROC" in k or k.startswith("threshold_FPR")}
  on_validation = job.on_split(config, "validation")
  # Every score variant the selection compares over the five splits, on validation only; the
  # config's own score last, so that the run's eval_validation/ holds its outputs.
  scores, variants, same = _selection().FIVE_SPLIT_SCORES, {}, []
  for name, overrides in scores.items():
    variant = on_validation.copy_and_resolve_references()
    variant.score.alpha = 0.0
    for key, value in overrides.items():
      variant.score[key.split(".")[1]] = value
    if variant.score.to_dict() == on_validation.score.to_dict():
      same.append(name)
      continue
    scored = job.evaluate(variant, workdir)
    variants[name] = {k: scored[k] for k in ("image_AUROC", "image_AUROC_df")}
  validation = job.evaluate(on_validation, workdir)
  for name in same:
    variants[name] = {k: validation[k] for k in ("image_AUROC", "image_AUROC_df")}
  variants = {name: variants[name] for name in scores}
  return {
    "data_seed": seed,
    **keep,
    **{f"validation_{k}": v for k, v in validation.items() if "AUROC" in k},
    "validation_scores": variants,
    "num_normal": result["num_normal"],
    "num_anomalous": result["num_anomalous"],
    "per_digit_AUROC": per_digit(config, workdir, result["step"]),
    **({} if reuse else {"wall_seconds": round(time.time() - t0, 1)}),
  }


def summarise(runs: list[dict]) -> dict:
  """Means over the splits and the model's per-split difference to each baseline."""
  model = np.array([r["image_AUROC"] for r in runs])
  out = {"mean_image_AUROC": float(model.mean()), "std_image_AUROC": float(model.std(ddof=1))}
  for name in BASELINES:
    base = np.array([r[f"baseline_image_AUROC_{name}"] for r in runs])
    diff = model - base
    out[f"mean_baseline_image_AUROC_{name}"] = float(base.mean())
    out[f"model_minus_{name}"] = [float(d) for d in diff]
    out[f"mean_model_minus_{name}"] = float(diff.mean())
    out[f"splits_model_at_least_{name}"] = int((diff >= 0).sum())
  for key in ("image_AUROC_df", "validation_image_AUROC", "validation_baseline_image_AUROC_knn"):
    out[f"mean_{key}"] = float(np.mean([r[key] for r in runs]))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0,1,2,3,4", help="config.data.seed values")
  parser.add_argument("--workroot", default=os.path.join(ROOT, "runs", "digits_split_seeds"))
  parser.add_argument("--candidate", default=None, help="a select_digits_defaults candidate")
  parser.add_argument("--reuse", action="store_true", help="evaluate the runs already trained")
  parser.add_argument("--json", action="store_true", help=f"write {os.path.relpath(OUT, ROOT)}")
  a = parser.parse_args()
  out_path = OUT
  if a.candidate is not None:
    a.workroot = os.path.join(a.workroot, a.candidate)
    out_path = OUT.replace(".json", f"_{a.candidate}.json")
  jax.config.update("jax_compilation_cache_dir", os.path.join(a.workroot, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
  )
  logging.getLogger("absl").setLevel(logging.WARNING)

  runs = [run(int(s), a.workroot, a.reuse, a.candidate) for s in a.seeds.split(",")]
  if a.reuse and os.path.exists(out_path):
    # The training times of the stored record stay with the runs they timed.
    with open(out_path) as f:
      timed = {
        r["data_seed"]: r["wall_seconds"] for r in json.load(f)["runs"] if "wall_seconds" in r
      }
    for r in runs:
      if r["data_seed"] in timed:
        r["wall_seconds"] = timed[r["data_seed"]]
  summary = summarise(runs)
  print("| split seed | model | deformation alone | k-NN | KDE | PCA | model - k-NN |")
  print("|---|---|---|---|---|---|---|")
  for r, d in zip(runs, summary["model_minus_knn"], strict=True):
    print(
      f"| {r['data_seed']} | {r['image_AUROC']:.4f} | {r['image_AUROC_df']:.4f} | "
      f"{r['baseline_image_AUROC_knn']:.4f} | {r['baseline_image_AUROC_kde']:.4f} | "
      f"{r['baseline_image_AUROC_pca']:.4f} | {d:+.4f} |"
    )
  print(
    f"| **mean** | **{summary['mean_image_AUROC']:.4f}** | {summary['mean_image_AUROC_df']:.4f} "
    f"| {summary['mean_baseline_image_AUROC_knn']:.4f} "
    f"| {summary['mean_baseline_image_AUROC_kde']:.4f} "
    f"| {summary['mean_baseline_image_AUROC_pca']:.4f} | {summary['mean_model_minus_knn']:+.4f} |"
  )
  print(
    f"validation means: model {summary['mean_validation_image_AUROC']:.4f}, "
    f"k-NN {summary['mean_validation_baseline_image_AUROC_knn']:.4f}"
  )
  print("\nper anomalous digit, AUROC against the test normals (model / k-NN):")
  digits = sorted(runs[0]["per_digit_AUROC"])
  print("| split seed | " + " | ".join(digits) + " |")
  print("|---|" + "---|" * len(digits))
  for r in runs:
    cells = (r["per_digit_AUROC"][d] for d in digits)
    row = " | ".join(f"{c['model']:.4f} / {c['knn']:.4f}" for c in cells)
    print(f"| {r['data_seed']} | {row} |")
  if a.json:
    out = {
      "command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)])
      + "".join(f" {x}" for x in sys.argv[1:]),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
      "config": "configs/digits_pdm.py (unchanged but config.data.seed)"
      if a.candidate is None
      else f"candidate {a.candidate} of experiments/select_digits_defaults.py, the demo's score",
      "runs": runs,
      "summary": summary,
    }
    with open(out_path, "w") as f:
      json.dump(out, f, indent=2)
    print(f"written: {os.path.relpath(out_path, ROOT)}")


if __name__ == "__main__":
  main()
