"""Chooses the image-mode settings of ``configs/digits_pdm.py`` on the validation split only.

  python experiments/select_digits_defaults.py [--candidates previous_defaults,...] [--reuse] \
      [--json]

The digits protocol (odd digits normal) holds a stratified 20% of its train part out of training
as a labelled validation split (``config.data.validation_fraction``). Each candidate below (a
named set of config overrides on :data:`PREVIOUS`: code resolution and book size, how the
codebook learns, the encoder mask, what the fields see, the reference loss, the deformation
range, the training length; one of them again from another seed) is trained from scratch, then
scored on the validation split by the eval job (``--config.eval.split=validation``) with each
score of :data:`SCORES` (the distance of the reconstruction error, the stage it reads and, for
one code per image, how many of the image's nearest prototypes it is scored against) and each
weight ``score.alpha`` of :data:`ALPHAS` (the fused score is that error plus alpha times the
deformation error; alpha = 0 is the reconstruction alone). The classical baselines are scored on
the same validation images. The candidate, score and alpha with the highest validation image
AUROC are the one-split choice. Since one validation split of 252 images is a noisy judge, the
final choice is made among the candidates also trained on five split seeds by
``experiments/digits_split_seeds.py --candidate NAME --json`` (train, validation and test parts
redrawn) and the score variants of :data:`FIVE_SPLIT_SCORES` scored on each of their validation
splits, by the mean validation AUROC there; only the chosen one is evaluated on the test split
here.

Writes ``experiments/results/digits_selection.json`` with ``--json``: every candidate's
overrides, wall time, validation AUROCs (fused for each score and alpha, reconstruction only,
deformation only) and baselines, the five-split means, both choices, and the chosen run's test
metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time

import jax

from dmad_jax.configs import load
from dmad_jax.evaluation import job
from dmad_jax.train import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "digits_selection.json")

# Every candidate is a set of config overrides (dotted keys) on PREVIOUS: configs/digits_pdm.py
# with the settings this search varies put back to the defaults it had before (the released
# code's quantiser, OffsetNet input and encoder mask, a 16-dimensional 4x4 code, chosen by an
# earlier search among codes of the released kind; scored by the final L1 error). A candidate's
# meaning therefore does not change when digits_pdm.py takes the chosen one.
PREVIOUS = {
  "augment.shift": 0,
  "model.channels": (16, 32, 64, 16),
  "model.coord_blocks": 4,
  "model.skip_channels": (),
  "model.mask_source": "encoder",
  "model.global_code": False,
  "model.offset_input": "input",
  "model.num_codes": 16,
  "model.vq_update": "loss",
  "model.vq_dead_threshold": 0.01,
  "model.max_offsets": (2.0, 3.0),
  "model.head_strides": ((1, 2, 2), (1, 1)),
  "loss.reference": 0.0,
  "score.distance": "l1",
  "score.stage": -1,
  "score.sum_stages": False,
  "score.alpha": 0.0,
  "total_steps": 1200,
  "checkpoint_every_steps": 600,
}
# One code per image (the 2x2 deepest level averaged; CoordConv blocks of 2 divide every
# level): the decoder can only produce num_codes references.
_GLOBAL_CODE = {
  "model.channels": (16, 32, 64, 64, 32),
  "model.coord_blocks": 2,
  "model.global_code": True,
}
_PROTOTYPES = {
  **_GLOBAL_CODE,
  "model.num_codes": 32,
  "model.mask_source": "none",
  "model.offset_input": "input_reference",
}
_EMA = {
  **_PROTOTYPES,
  "model.num_codes": 64,
  "model.vq_update": "ema",
  "model.vq_dead_threshold": 0.1,
  "loss.reference": 1.0,
}
CANDIDATES = {
  # The defaults before this search (a 16-dimensional 4x4 code, encoder mask).
  "previous_defaults": {},
  # The same code without the encoder mask, which carries the input's shape at full resolution.
  "narrow_code_nomask": {"model.mask_source": "none"},
  # One code per image, 32 codes: with the mask, then without, then fields that see the
  # reference.
  "code1x1_codes32": {**_GLOBAL_CODE, "model.num_codes": 32},
  "code1x1_nomask": {**_GLOBAL_CODE, "model.num_codes": 32, "model.mask_source": "none"},
  "code1x1_nomask_refoffsets": _PROTOTYPES,
  # 64 codes and the reference loss, with the released codebook loss, then the EMA codebook
  # with restarts; then 128 codes and other deformation ranges.
  "proto_ref_loss_codes64": {**_PROTOTYPES, "loss.reference": 1.0, "model.num_codes": 64},
  "proto_ema64_ref": _EMA,
  "ema128_ref": {**_EMA, "model.num_codes": 128},
  "ema64_ref_small_offsets": {**_EMA, "model.max_offsets": (1.0, 1.5)},
  "ema64_ref_coarse4": {**_EMA, "model.max_offsets": (4.0, 3.0)},
  # Training length and batch: twice the steps at batch 32, and at batch 16 (the same epochs).
  "ema64_ref_steps2400": {**_EMA, "total_steps": 2400, "checkpoint_every_steps": 1200},
  "ema64_ref_batch16_steps2400": {
    **_EMA,
    "batch_size": 16,
    "total_steps": 2400,
    "checkpoint_every_steps": 1200,
  },
  # Half the steps; and the chosen recipe from another initialisation (how much of a
  # difference between candidates the seed alone makes).
  "ema64_ref_steps600": {**_EMA, "total_steps": 600, "checkpoint_every_steps": 300},
  "ema64_ref_seed1": {**_EMA, "seed": 1},
  # The EMA codebook without the reference loss (the fields alone fit the prototype).
  "ema64_noref": {**_EMA, "loss.reference": 0.0},
  # Longer training scored lower on validation (steps2400): the training images are fitted
  # better than unseen ones. Random translations of the training images by up to 2 or 4 pixels
  # (half or one pixel of the 8x8 scans), which the deformation fields should absorb.
  "ema64_ref_shift2": {**_EMA, "augment.shift": 2},
  "ema64_ref_shift4": {**_EMA, "augment.shift": 4},
  # Sharper prototypes: four times the codes (fewer images averaged into each), or the
  # reference loss three times as strong.
  "ema256_ref": {**_EMA, "model.num_codes": 256},
  "ema64_ref_weight3": {**_EMA, "loss.reference": 3.0},
  # A stiffer coarse field, so that it absorbs slant and thickness but not another digit's
  # shape: predicted on a 4x4 or a 2x2 grid instead of 8x8 (the resolution of the scans), or
  # the deformation regulariser four times as strong.
  "ema64_ref_coarse_grid4": {**_EMA, "model.head_strides": ((2, 2, 2), (1, 1))},
  "ema64_ref_coarse_grid2": {**_EMA, "model.head_strides": ((2, 2, 2, 2), (1, 1))},
  # The 4x4 field with twice the prototypes: a stiffer field leaves more of the normal
  # variation to the bank.
  "ema128_ref_coarse_grid4": {
    **_EMA,
    "model.num_codes": 128,
    "model.head_strides": ((2, 2, 2), (1, 1)),
  },
  "ema64_ref_offset1": {**_EMA, "loss.offset": 1.0},
}
ALPHAS = (0.0, 0.03, 0.1, 0.3, 1.0)
# The validation AUROC of the deformation alone a candidate needs to be chosen (chance is 0.5).
MIN_DEFORMATION = 0.75
# Score variants tried with every alpha: the distance of the reconstruction error and which
# deformation stage it reads (-1 the final one, 0 the coarse one).
SCORES = {
  "l1": {"score.distance": "l1"},
  "l2": {"score.distance": "l2"},
  "l2_coarse": {"score.distance": "l2", "score.stage": 0},
  # The same, each image scored against the best fitting of its 8 or 32 nearest prototypes.
  "l2_coarse_p8": {"score.distance": "l2", "score.stage": 0, "score.prototypes": 8},
  "l2_coarse_p32": {"score.distance": "l2", "score.stage": 0, "score.prototypes": 32},
}


def _config(overrides: dict, **extra):
  config = load(os.path.join(ROOT, "configs", "digits_pdm.py"))
  for key, value in {**PREVIOUS, **overrides, **extra}.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def _auroc_keys(result: dict) -> dict:
  return {k: v for k, v in result.items() if "AUROC" in k and not isinstance(v, str)}


def run_candidate(name: str, overrides: dict, workroot: str, reuse: bool = False) -> dict:
  workdir = os.path.join(workroot, name)
  # As JSON has them (nested tuples as nested lists), so that a stored record compares equal.
  out = {"overrides": json.loads(json.dumps(overrides))}
  record = os.path.join(workdir, "candidate.json")
  done = None
  if reuse and os.path.exists(record):
    with open(record) as f:
      done = json.load(f)
  if done is not None and done["overrides"] == out["overrides"]:
    out["train_seconds"] = done["train_seconds"]  # trained by an earlier run of this script
  else:
    done = None
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    train_and_evaluate(_config(overrides), workdir)
    out["train_seconds"] = round(time.time() - t0, 1)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line)["perplexity"] for line in f if '"perplexity"' in line]
  # How many codes a training batch used (exp of the entropy of its code usage), averaged over
  # the last four logged steps (every 50th).
  out["batch_perplexity_at_end"] = round(sum(logged[-4:]) / 4, 2)
  # Variants scored by an earlier run of the same trained candidate are kept (their settings
  # are recorded by name in validation_of); only new ones are scored.
  known = {}
  if done is not None:
    was = done.get("validation_of", {})
    changed = [k for k, v in was.get("scores", {}).items() if SCORES.get(k) != v]
    if was.get("alphas") == list(ALPHAS):
      known = {
        k: v
        for k, v in done["validation"].items()
        if not any(k.startswith(f"image_AUROC_{c}_") for c in changed)
      }
  out["validation"] = score_validation(overrides, workdir, known)
  with open(record, "w") as f:
    json.dump({**out, "validation_of": {"scores": SCORES, "alphas": list(ALPHAS)}}, f)
  return out


def score_validation(overrides: dict, workdir: str, known: dict | None = None) -> dict:
  """The validation AUROCs of a trained candidate for every score variant and alpha (those in
  ``known``, from an earlier run of the same candidate, are not scored again)."""
  validation = dict(known or {})
  for score, alpha in ((s, a) for s in SCORES for a in ALPHAS):
    if f"image_AUROC_{score}_alpha_{alpha}" in validation:
      continue
    config = _config(
      overrides, **{"eval.split": "validation", "score.alpha": alpha, **SCORES[score]}
    )
    if config.score.prototypes > 1 and not config.model.global_code:
      continue  # more than one prototype per image needs one code per image
    first = "image_AUROC_df" not in validation
    config.eval.baselines = first  # once: they do not depend on the model
    result = job.evaluate(config, workdir)
    if first:
      validation.update(
        {k: v for k, v in _auroc_keys(result).items() if k != "image_AUROC"},
        num_normal=result["num_normal"],
        num_anomalous=result["num_anomalous"],
      )
    validation[f"image_AUROC_{score}_alpha_{alpha}"] = result["image_AUROC"]
    validation[f"image_AUROC_{score}_rec"] = result["image_AUROC_rec"]
  return validation


def best_choice(runs: dict, *, min_deformation: float = 0.0) -> dict:
  """The candidate, score variant and alpha with the highest validation image AUROC among the
  candidates whose deformation alone reaches ``min_deformation`` on validation."""
  best, name, score, alpha = max(
    (r["validation"][f"image_AUROC_{score}_alpha_{alpha}"], name, score, alpha)
    for name, r in runs.items()
    if r["validation"]["image_AUROC_df"] >= min_deformation
    for score in SCORES
    for alpha in ALPHAS
    if f"image_AUROC_{score}_alpha_{alpha}" in r["validation"]
  )
  return {"candidate": name, "score": SCORES[score], "score.alpha": alpha,
          "validation_image_AUROC": best}  # fmt: skip


# One validation split is a noisy judge: the recipe chosen on it (proto_ema64_ref, 0.9914 there)
# scored 0.973-0.991 on the validation splits of four other split seeds. The final choice is
# therefore made among the candidates that ``experiments/digits_split_seeds.py --candidate NAME
# --json`` trained on five split seeds (their records, FIVE_SPLITS) and the score variants of
# FIVE_SPLIT_SCORES (alpha 0) those records scored on every validation split, by the mean
# validation image AUROC there; the test parts of those runs are only reported. Without any such
# record the one-split choice stands.
FIVE_SPLITS = os.path.join(HERE, "results", "digits_split_seeds_{}.json")
# The error after the coarse deformation (the one-split choice) or summed over both stages (as
# the training loss sums them: what the fine field could not fit either counts), against the
# best fitting of an image's 32 nearest prototypes or of 64 (with 64 codes: the whole bank).
_COARSE = {"score.distance": "l2", "score.stage": 0, "score.sum_stages": False}
_STAGES = {"score.distance": "l2", "score.stage": 0, "score.sum_stages": True}
FIVE_SPLIT_SCORES = {
  "l2_coarse_p32": {**_COARSE, "score.prototypes": 32},
  "l2_coarse_p64": {**_COARSE, "score.prototypes": 64},
  "l2_stages_p32": {**_STAGES, "score.prototypes": 32},
  "l2_stages_p64": {**_STAGES, "score.prototypes": 64},
}


def five_split_records(names) -> dict:
  """Per candidate with a five-split record: its validation AUROCs and test means."""
  out = {}
  for name in names:
    path = FIVE_SPLITS.format(name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      record = json.load(f)
    runs, summary = record["runs"], record["summary"]
    scores = [s for s in FIVE_SPLIT_SCORES if all(s in r["validation_scores"] for r in runs)]
    out[name] = {
      "record": os.path.relpath(path, ROOT),
      "data_seeds": [r["data_seed"] for r in runs],
      "validation_image_AUROC": {
        s: [r["validation_scores"][s]["image_AUROC"] for r in runs] for s in scores
      },
      "mean_validation_image_AUROC": {
        s: sum(r["validation_scores"][s]["image_AUROC"] for r in runs) / len(runs) for s in scores
      },
      "mean_validation_image_AUROC_df": {
        s: sum(r["validation_scores"][s]["image_AUROC_df"] for r in runs) / len(runs)
        for s in scores
      },
      "mean_validation_baseline_image_AUROC_knn": summary[
        "mean_validation_baseline_image_AUROC_knn"
      ],
      "mean_test_image_AUROC": summary["mean_image_AUROC"],
      "mean_test_image_AUROC_df": summary["mean_image_AUROC_df"],
      "mean_test_baseline_image_AUROC_knn": summary["mean_baseline_image_AUROC_knn"],
    }
  return out


def five_split_choice(records: dict, *, min_deformation: float) -> dict | None:
  """The candidate and score variant with the highest mean validation AUROC over the five splits
  among those whose deformation alone reaches ``min_deformation`` there (None without
  records)."""
  eligible = [
    (r["mean_validation_image_AUROC"][s], name, s)
    for name, r in records.items()
    for s in r["mean_validation_image_AUROC"]
    if r["mean_validation_image_AUROC_df"][s] >= min_deformation
  ]
  if not eligible:
    return None
  best, name, score = max(eligible)
  return {
    "candidate": name,
    "score": FIVE_SPLIT_SCORES[score],
    "score_name": score,
    "score.alpha": 0.0,
    "mean_validation_image_AUROC_five_splits": best,
  }


def metrics_on_test(choice: dict, workroot: str) -> dict:
  config = _config(
    CANDIDATES[choice["candidate"]], **{"score.alpha": choice["score.alpha"], **choice["score"]}
  )
  test = job.evaluate(config, os.path.join(workroot, choice["candidate"]))
  return {**_auroc_keys(test), "num_normal": test["num_normal"], "step": test["step"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--candidates", default=",".join(CANDIDATES))
  parser.add_argument("--workroot", default=os.path.join(ROOT, "runs", "digits_selection"))
  parser.add_argument("--json", action="store_true", help=f"store the result in {OUT}")
  parser.add_argument(
    "--reuse",
    action="store_true",
    help="keep a candidate's run from an earlier call with the same overrides (no retraining)",
  )
  a = parser.parse_args()
  names = a.candidates.split(",")
  unknown = sorted(set(names) - set(CANDIDATES))
  if unknown:
    raise SystemExit(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
  jax.config.update("jax_compilation_cache_dir", os.path.join(a.workroot, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)

  runs = {}
  for name in names:
    runs[name] = run_candidate(name, CANDIDATES[name], a.workroot, a.reuse)
    print(name, json.dumps(runs[name]["validation"]), flush=True)
  # The acceptance lines ask for DMAD's mechanism as well as the score: the deformation alone
  # must tell anomalies apart (MIN_DEFORMATION on validation), so only such candidates are
  # chosen from; the unconstrained best is recorded next to it.
  one_split = best_choice(runs, min_deformation=MIN_DEFORMATION)
  five_splits = five_split_records(names)
  chosen = five_split_choice(five_splits, min_deformation=MIN_DEFORMATION) or one_split
  unconstrained = best_choice(runs)
  result = {
    "command": " ".join(["python", "experiments/select_digits_defaults.py", *sys.argv[1:]]),
    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    "protocol": str(load(os.path.join(ROOT, "configs", "digits_pdm.py")).data.protocol),
    "selection": (
      "highest validation image AUROC over candidates x score variants x score.alpha, among "
      f"the candidates whose deformation alone reaches {MIN_DEFORMATION} on validation; then, "
      "among the candidates trained on five split seeds and the score variants scored there, "
      "the highest mean validation image AUROC (the same bound on the deformation alone)"
    ),
    "alphas": list(ALPHAS),
    "scores": SCORES,
    "five_split_scores": FIVE_SPLIT_SCORES,
    "min_deformation_AUROC": MIN_DEFORMATION,
    "candidates": runs,
    "chosen_on_one_split": one_split,
    "five_splits": five_splits,
    "chosen": chosen,
    "test": metrics_on_test(chosen, a.workroot),
    "unconstrained_best": {**unconstrained, "test": metrics_on_test(unconstrained, a.workroot)},
  }
  print(json.dumps(result["chosen"]), json.dumps(result["test"]), sep="\n")
  if a.json:
    with open(OUT, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
