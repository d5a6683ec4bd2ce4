"""The demo protocol in float32 and in bfloat16 compute, same steps and seed, through ``dmad``.

  python experiments/bfloat16_demo.py [--runlocal] [--json]

Runs, as ``make demo`` does, ``dmad train`` and ``dmad eval`` with ``configs/digits_pdm.py``
(DMAD-PDM on scikit-learn's digits, odd digits normal), once with the config as it is
(``compute_dtype = "float32"``) and once with ``--config.compute_dtype=bfloat16``: convolutions,
matmuls and activations in bfloat16, parameters, optimizer state, BatchNorm statistics, losses
and scores in float32 (``dmad_jax.nn.precision``). Records each run's image AUROCs, final
training loss, steps and wall times, and the AUROC difference. ``--runlocal`` runs the
test-sized config instead (seconds; what ``tests/experiments_test.py`` runs).
Stored with ``--json``: ``experiments/results/bfloat16_demo.json``.

On a CPU, XLA computes bfloat16 convolutions without bfloat16 hardware, so the wall times say
nothing about an accelerator; the AUROCs say whether the precision costs accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DMAD = os.path.join(os.path.dirname(sys.executable), "dmad")
OUT = os.path.join(HERE, "results", "bfloat16_demo.json")
DTYPES = ("float32", "bfloat16")


def _dmad(args: list[str], cwd: str) -> float:
  t0 = time.time()
  proc = subprocess.run([DMAD, *args], cwd=cwd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"dmad {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
  return time.time() - t0


def one_run(config: str, dtype: str, work: str) -> dict:
  """``dmad train`` + ``dmad eval`` of ``config`` computing in ``dtype``; its metrics."""
  flags = [f"--config={config}", f"--workdir={dtype}", f"--config.compute_dtype={dtype}"]
  train_s = _dmad(["train", *flags], work)
  eval_s = _dmad(["eval", *flags], work)
  with open(os.path.join(work, dtype, "eval", "metrics.json")) as f:
    metrics = json.load(f)
  with open(os.path.join(work, dtype, "metrics.jsonl")) as f:
    log = [json.loads(line) for line in f]
  with open(os.path.join(work, dtype, "config.json")) as f:
    stored = json.load(f)
  return {
    "compute_dtype_of_the_run": stored["compute_dtype"],
    "steps": metrics["step"],
    "seed": stored["seed"],
    "final_loss": log[-1]["loss"],
    "image_AUROC": metrics["image_AUROC"],
    "image_AUROC_rec": metrics["image_AUROC_rec"],
    "image_AUROC_df": metrics["image_AUROC_df"],
    "train_seconds": round(train_s, 1),
    "eval_seconds": round(eval_s, 1),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runlocal", action="store_true", help="the test-sized config")
  parser.add_argument("--json", action="store_true", help=f"store the result in {OUT}")
  a = parser.parse_args()
  config = os.path.join(ROOT, "configs", "digits_pdm.py") + (":runlocal" if a.runlocal else "")
  work = tempfile.mkdtemp(prefix="dmad_bf16_")
  try:
    runs = {dtype: one_run(config, dtype, work) for dtype in DTYPES}
  finally:
    shutil.rmtree(work, ignore_errors=True)
  result = {
    "command": "python experiments/bfloat16_demo.py" + (" --runlocal" if a.runlocal else ""),
    "config": os.path.relpath(config, ROOT),
    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (no accelerator)",
    "runs": runs,
    "image_AUROC_bfloat16_minus_float32": runs["bfloat16"]["image_AUROC"]
    - runs["float32"]["image_AUROC"],
  }
  print(json.dumps(result, indent=2))
  if a.json:
    with open(OUT, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
