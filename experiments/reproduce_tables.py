"""One command per seed-paper table: DAGM 2007 (ARD's main table) and the one-class MNIST /
Fashion-MNIST / CIFAR-10 protocol, every class trained and evaluated, written beside the paper's
numbers.

  python experiments/reproduce_tables.py --table dagm --model ard \\
    --args 'root=/data/dagm;weights=wrn50_2.npz'
  python experiments/reproduce_tables.py --table dagm --model rd \\
    --args 'root=/data/dagm;weights=wrn50_2.npz'
  python experiments/reproduce_tables.py --table cifar10 --model ard --args 'weights=r34.npz'
  python experiments/reproduce_tables.py --table mnist --model igd

For each class k of the table (DAGM classes 1-10, or the ten one-class problems normal=0..9):
train ``configs/<dagm|oneclass>_<model>.py`` with the ``--args`` given (and ``class=k`` or
``dataset=<table>;normal=k``) in ``<workroot>/<table>_<model>/<k>``, run the eval job on the last
checkpoint, and keep its image AUROC (and, on DAGM, pixel AUROC and AUPRO). A rerun resumes: a
class whose training finished and whose last checkpoint is evaluated is read back, not redone.

Writes ``experiments/results/<table>_<model>.json`` (``--out``: every metric of every class, the
means, the paper's numbers, the settings, the command and the machine) and prints a Markdown table
with the paper's numbers beside the measured ones. The paper numbers are those of
dmad_jax/configs/ard.py and dmad_jax/configs/oneclass.py (ARD's supplementary, DMAD's, DAAD's
and IGD's tables). ``--args`` with ``runlocal`` runs the tests' tiny settings (random teachers,
two steps): such results measure nothing but that the table's pipeline runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import numpy as np

from dmad_jax.configs import ard, dagm, load, oneclass
from dmad_jax.evaluation import job
from dmad_jax.train import checkpoint, train_and_evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TABLES = ("dagm", *oneclass.DATASETS)
MODELS = {"dagm": ("rd", "ard"), **{t: tuple(oneclass.PAPER) for t in oneclass.DATASETS}}
METRICS = {"dagm": ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")}


def classes(table: str) -> tuple[int, ...]:
  return dagm.CLASSES if table == "dagm" else oneclass.CLASSES


def config_of(table: str, model: str, args: str, k: int):
  """The config of class ``k`` of ``table`` for ``model``, with the user's ``args``."""
  if table == "dagm":
    path, arg = f"configs/dagm_{model}.py", f"class={k}"
  else:
    path, arg = f"configs/oneclass_{model}.py", f"dataset={table};normal={k}"
  return path, load(os.path.join(ROOT, path), ";".join(a for a in (args, arg) if a))


def paper(table: str, model: str) -> dict:
  """The paper's numbers for ``model`` on ``table``: per class where published, and means."""
  if table == "dagm":
    out = {"mean": ard.PAPER_DAGM_MEAN.get(model, {})}
    if model in ard.PAPER_DAGM_DETECTION:
      out["image_AUROC"] = dict(zip(dagm.CLASSES, ard.PAPER_DAGM_DETECTION[model], strict=True))
    return out
  mean = oneclass.PAPER.get(model, {}).get(table)
  return {"mean": {} if mean is None else {"image_AUROC": mean}}


def run_class(table: str, model: str, args: str, k: int, workroot: str) -> dict:
  """Trains (or resumes) and evaluates class ``k``; returns the eval job's metrics."""
  path, config = config_of(table, model, args, k)
  workdir = os.path.join(workroot, f"{table}_{model}", str(k))
  metrics_file = os.path.join(workdir, "eval", "metrics.json")
  t0 = time.time()
  train_and_evaluate(config, workdir)  # returns at once when the run is complete
  last = checkpoint.manager(workdir, read_only=True).latest_step()
  if os.path.exists(metrics_file):
    with open(metrics_file) as f:
      done = json.load(f)
    if done.get("step") == last:
      return done
  result = job.evaluate(config, workdir)
  result["config"] = path
  result["wall_seconds"] = time.time() - t0
  return result


def _relative(value):
  if isinstance(value, str) and os.path.isabs(value) and value.startswith(ROOT + os.sep):
    return os.path.relpath(value, ROOT)
  return value


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--table", required=True, choices=TABLES)
  parser.add_argument("--model", required=True, help="rd or ard for dagm; rd, ard, ppdm, daad, igd")
  parser.add_argument(
    "--args", default="", help="config args, e.g. 'root=/data/dagm;weights=w.npz'"
  )
  parser.add_argument("--classes", default="", help="comma-separated subset (default: all)")
  parser.add_argument("--workroot", default=os.path.join(ROOT, "runs", "tables"))
  parser.add_argument("--out", default=None, help="results JSON (default: see above)")
  a = parser.parse_args(argv)
  if a.model not in MODELS[a.table]:
    parser.error(f"--model {a.model!r} has no {a.table} config; one of {MODELS[a.table]}")
  ks = [int(k) for k in a.classes.split(",")] if a.classes else list(classes(a.table))
  bad = [k for k in ks if k not in classes(a.table)]
  if bad:
    parser.error(f"--classes {bad} are not classes of {a.table} ({classes(a.table)})")
  out = a.out or os.path.join(HERE, "results", f"{a.table}_{a.model}.json")
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
  )
  logging.getLogger("absl").setLevel(logging.WARNING)

  metrics = METRICS.get(a.table, ("image_AUROC",))
  runs = {}
  for k in ks:
    logging.info("%s %s: class %d (%d of %d)", a.table, a.model, k, len(runs) + 1, len(ks))
    r = run_class(a.table, a.model, a.args, k, os.path.abspath(a.workroot))
    runs[k] = {key: _relative(v) for key, v in r.items()}
  mean = {m: float(np.mean([runs[k][m] for k in ks])) for m in metrics if m in runs[ks[0]]}
  reported = paper(a.table, a.model)
  summary = {
    "table": a.table,
    "model": a.model,
    "args": a.args,
    "classes": ks,
    "runs": {str(k): v for k, v in runs.items()},
    "mean": mean,
    "paper": {key: ({str(c): v for c, v in val.items()}) for key, val in reported.items()},
    "command": " ".join(
      ["python", os.path.relpath(os.path.abspath(__file__), ROOT)]
      + (sys.argv[1:] if argv is None else list(argv))
    ),
    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
  }
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(summary, f, indent=2)

  def cell(value):
    return "" if value is None else f"{100 * value:.1f}"

  print(f"{a.table}, {a.model} (AUROC %, measured | paper)")
  print("| class | " + " | ".join(f"{m} | paper" for m in metrics) + " |")
  print("|---|" + "---|---|" * len(metrics))
  for k in ks:
    cells = [f"{cell(runs[k].get(m))} | {cell(reported.get(m, {}).get(k))}" for m in metrics]
    print(f"| {k} | " + " | ".join(cells) + " |")
  cells = [f"{cell(mean.get(m))} | {cell(reported['mean'].get(m))}" for m in metrics]
  print("| **mean** | " + " | ".join(cells) + " |")
  print(f"written: {out}")
  return summary


if __name__ == "__main__":
  main()
