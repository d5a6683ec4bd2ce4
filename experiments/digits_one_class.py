"""One-class AUROC on scikit-learn's handwritten digits, every digit as the normal class.

  python experiments/digits_one_class.py [--steps 300] [--digits 0,1,...] [--odd_even]

For each digit k: train DMAD-PDM (configs/digits_pdm.py, protocol one_class=k) on the normal
training images of the seeded stratified split, evaluate on the whole test part (all ten digits,
label 1 unless the digit is k) with the separate eval job, and record the image AUROCs. With
``--odd_even`` the paper's toy protocol (normal = 1,3,5,7,9) is run too.

Writes ``experiments/results/digits_one_class.json`` (every metric of every run, the config
overrides and the machine) and prints a Markdown table with the mean over the ten digits.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from configs import digits_pdm  # noqa: E402
from dmad_jax.evaluation import job  # noqa: E402
from dmad_jax.train import train_and_evaluate  # noqa: E402


def run(protocol: str, steps: int | None, workroot: str) -> dict:
  config = digits_pdm.get_config(f"protocol={protocol}")
  if steps:
    config.total_steps = steps
    config.checkpoint_every_steps = steps
  workdir = os.path.join(workroot, protocol.replace("=", "_").replace(",", ""))
  shutil.rmtree(workdir, ignore_errors=True)  # every run of this script trains from scratch
  t0 = time.time()
  train_and_evaluate(config, workdir)
  result = job.evaluate(config, workdir)
  result["protocol"] = protocol
  result["total_steps"] = int(config.total_steps)
  result["wall_seconds"] = time.time() - t0
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=None, help="override config.total_steps")
  parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
  parser.add_argument("--odd_even", action="store_true", help="also run normal=1,3,5,7,9")
  parser.add_argument("--workroot", default=os.path.join(ROOT, "runs", "digits_one_class"))
  parser.add_argument("--out", default=os.path.join(HERE, "results", "digits_one_class.json"))
  args = parser.parse_args()
  # force: TensorFlow/absl may already have configured the root logger at import time.
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
  )
  logging.getLogger("dmad_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)

  protocols = [f"one_class={d}" for d in args.digits.split(",")]
  if args.odd_even:
    protocols.append("normal=1,3,5,7,9")
  results = [run(p, args.steps, args.workroot) for p in protocols]
  one_class = [r for r in results if r["protocol"].startswith("one_class=")]
  summary = {
    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    "command": " ".join(sys.argv),
    "runs": results,
  }
  if one_class:
    summary["mean_image_AUROC_one_class"] = sum(r["image_AUROC"] for r in one_class) / len(
      one_class
    )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(summary, f, indent=2)

  print("| protocol | image AUROC | AUROC (rec only) | AUROC (deformation only) | steps |")
  print("|---|---|---|---|---|")
  for r in results:
    print(
      f"| {r['protocol']} | {r['image_AUROC']:.4f} | {r['image_AUROC_rec']:.4f} | "
      f"{r['image_AUROC_df']:.4f} | {r['total_steps']} |"
    )
  if one_class:
    print(f"| **mean of one_class=0..9** | **{summary['mean_image_AUROC_one_class']:.4f}** | | | |")
  print(f"written: {args.out}")


if __name__ == "__main__":
  main()
