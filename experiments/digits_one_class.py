"""One-class AUROC on scikit-learn's handwritten digits, every digit as the normal class.

  python experiments/digits_one_class.py [--steps 300] [--digits 0,1,...] [--odd_even] \
      [--validation] [--reuse]
  python experiments/digits_one_class.py --model daad --steps 150
  python experiments/digits_one_class.py --model daad_plus --steps 150
  python experiments/digits_one_class.py --model igd

For each digit k: train the model (``--model``: ``pdm`` = DMAD-PDM, configs/digits_pdm.py; or a
DAAD row of configs/digits_daad.py: ``ae``, ``memae``, ``ae_skip``, ``daad``, ``daad_plus``; or
``igd``, configs/digits_igd.py) with
protocol one_class=k on the normal training images of the seeded stratified split, evaluate on
the whole test part (all ten digits, label 1 unless the digit is k) with the separate eval job,
and record the image AUROCs. With ``--odd_even`` the paper's toy protocol (normal = 1,3,5,7,9)
is run too. ``--validation`` also records every AUROC on the run's validation split (20% of the
train part, labelled, never trained on: where this protocol's settings may be compared), and
the means over the digits; ``--reuse`` evaluates a run already trained with the same config
instead of training it again (its ``wall_seconds`` are then not recorded).

Writes ``experiments/results/digits_one_class.json`` for pdm and
``experiments/results/digits_one_class_<model>.json`` otherwise (every metric of every run, the
config overrides and the machine) and prints a Markdown table with the mean over the ten digits.
Compiled programs are cached under ``<workroot>/jax_cache``, so the runs after the first of a
model skip most of XLA's compile time.
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

from dmad_jax.configs import daad, load
from dmad_jax.evaluation import job
from dmad_jax.train import train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MODELS = ("pdm", *daad.VARIANTS, "igd")
# Score columns of the printed table per model: (metric key, header).
COLUMNS = {
  "pdm": (("image_AUROC_rec", "AUROC (rec only)"), ("image_AUROC_df", "AUROC (deformation only)")),
  "daad_plus": (("image_AUROC_rec", "AUROC (R only)"), ("image_AUROC_ali", "AUROC (L only)")),
  "igd": (("image_AUROC_recon", "AUROC (recon only)"), ("image_AUROC_gsvdd", "AUROC (GSVDD only)")),
}


def get_config(model: str, protocol: str):
  """The digits config of ``model`` for ``protocol``."""
  if model == "pdm":
    return load(os.path.join(ROOT, "configs", "digits_pdm.py"), f"protocol={protocol}")
  if model == "igd":
    return load(os.path.join(ROOT, "configs", "digits_igd.py"), f"protocol={protocol}")
  return load(
    os.path.join(ROOT, "configs", "digits_daad.py"), f"variant={model};protocol={protocol}"
  )


def run(
  protocol: str,
  steps: int | None,
  workroot: str,
  model: str = "pdm",
  *,
  validation: bool = False,
  reuse: bool = False,
) -> dict:
  config = get_config(model, protocol)
  if steps:
    config.total_steps = steps
    config.checkpoint_every_steps = steps
  name = protocol.replace("=", "_").replace(",", "")
  workdir = os.path.join(workroot, name if model == "pdm" else f"{model}_{name}")
  t0 = time.time()
  if not (reuse and _trained_as(workdir, config)):
    shutil.rmtree(workdir, ignore_errors=True)  # a run of this script trains from scratch
    train_and_evaluate(config, workdir)
    reuse = False
  result = job.evaluate(config, workdir)
  if validation:
    # The same AUROCs on the validation split (held out of training, labelled): where settings
    # of this protocol may be compared without looking at the test split.
    scored = job.evaluate(job.on_split(config, "validation"), workdir)
    result.update({f"validation_{k}": v for k, v in scored.items() if "AUROC" in k})
  result["protocol"] = protocol
  if model != "pdm":
    result["model"] = model
  result["total_steps"] = int(config.total_steps)
  if not reuse:
    result["wall_seconds"] = time.time() - t0
  # Stored results name files relative to the repository.
  return {k: _relative(v) for k, v in result.items()}


def _trained_as(workdir: str, config) -> bool:
  """Whether ``workdir`` holds a finished run of ``config`` (its stored config.json equal)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(os.path.join(workdir, "checkpoints", str(config.total_steps))):
    return False
  with open(path) as f:
    stored = json.load(f)
  return stored == json.loads(config.to_json_best_effort())


def _relative(value):
  if isinstance(value, str) and os.path.isabs(value) and value.startswith(ROOT + os.sep):
    return os.path.relpath(value, ROOT)
  return value


def _settings(config, steps: int | None) -> dict:
  keep = ("model_name", "model", "loss", "score", "optimizer", "batch_size", "total_steps")
  d = json.loads(config.to_json_best_effort())
  out = {k: d[k] for k in keep if k in d}
  if steps:
    out["total_steps"] = steps
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="pdm", choices=MODELS, help="detector (config row)")
  parser.add_argument("--steps", type=int, default=None, help="override config.total_steps")
  parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
  parser.add_argument("--odd_even", action="store_true", help="also run normal=1,3,5,7,9")
  parser.add_argument("--workroot", default=os.path.join(ROOT, "runs", "digits_one_class"))
  parser.add_argument("--out", default=None, help="results JSON (default: see above)")
  parser.add_argument(
    "--validation", action="store_true", help="also report AUROCs on the validation split"
  )
  parser.add_argument(
    "--reuse", action="store_true", help="evaluate runs already trained with the same config"
  )
  args = parser.parse_args()
  if args.out is None:
    suffix = "" if args.model == "pdm" else f"_{args.model}"
    args.out = os.path.join(HERE, "results", f"digits_one_class{suffix}.json")
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workroot, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  # force: TensorFlow/absl may already have configured the root logger at import time.
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
  )
  logging.getLogger("dmad_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)

  protocols = [f"one_class={d}" for d in args.digits.split(",")]
  if args.odd_even:
    protocols.append("normal=1,3,5,7,9")
  results = [
    run(p, args.steps, args.workroot, args.model, validation=args.validation, reuse=args.reuse)
    for p in protocols
  ]
  one_class = [r for r in results if r["protocol"].startswith("one_class=")]
  summary = {
    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    "model": args.model,
    "command": " ".join(
      ["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:]
    ),
    "runs": results,
    # The settings that produced the numbers (those of the first protocol; only the protocol
    # differs between runs).
    "settings": _settings(get_config(args.model, protocols[0]), args.steps),
  }
  if one_class:
    summary["mean_image_AUROC_one_class"] = sum(r["image_AUROC"] for r in one_class) / len(
      one_class
    )
    # Means of every AUROC over the one-class runs (model, its parts, the baselines; test and,
    # with --validation, validation).
    keys = [k for k in one_class[0] if "AUROC" in k and isinstance(one_class[0][k], float)]
    summary["mean_one_class"] = {k: sum(r[k] for r in one_class) / len(one_class) for k in keys}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(summary, f, indent=2)

  columns = COLUMNS.get(args.model, ())
  print("| protocol | image AUROC | " + "".join(f"{h} | " for _, h in columns) + "steps |")
  print("|---|---|" + "---|" * len(columns) + "---|")
  for r in results:
    cells = "".join(f"{r[k]:.4f} | " for k, _ in columns)
    print(f"| {r['protocol']} | {r['image_AUROC']:.4f} | {cells}{r['total_steps']} |")
  if one_class:
    mean = summary["mean_image_AUROC_one_class"]
    print(f"| **mean of one_class=0..9** | **{mean:.4f}** | " + "| " * len(columns) + "|")
  print(f"written: {args.out}")


if __name__ == "__main__":
  main()
