"""experiments/reproduce_tables.py end to end on test-built data: the DAGM table (RD, image and
pixel metrics beside the paper's) through the script as users run it, and every one-class
protocol config (RD, ARD, PPDM, DAAD, IGD) on locally prepared TFDS copies of MNIST,
Fashion-MNIST and CIFAR-10."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "reproduce_tables.py")


@pytest.mark.slow  # trains and evaluates RD (a ResNet student) in a subprocess
def test_dagm_table_of_rd_through_the_script(tmp_path, dagm_writer):
  root = dagm_writer(tmp_path / "dagm", class_id=4, pixels=48)
  out = tmp_path / "dagm_rd.json"
  proc = subprocess.run(
    [sys.executable, SCRIPT, "--table=dagm", "--model=rd", "--classes=4"]
    + [f"--args=root={root};runlocal;image_size=32", f"--workroot={tmp_path / 'runs'}"]
    + [f"--out={out}"],
    cwd=tmp_path,
    env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  run = result["runs"]["4"]
  assert (run["num_normal"], run["num_anomalous"]) == (3, 3)
  for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
    assert 0.0 <= run[key] <= 1.0 and result["mean"][key] == run[key]
  assert result["paper"]["mean"] == {
    "image_AUROC": 0.904,
    "pixel_AUROC": 0.947,
    "pixel_AUPRO": 0.894,
  }
  assert "| 4 |" in proc.stdout and "| **mean** |" in proc.stdout and "90.4" in proc.stdout


@pytest.mark.slow  # five detectors compiled and trained
@pytest.mark.parametrize(
  "table,model",
  [("mnist", "rd"), ("cifar10", "ard"), ("fashion_mnist", "ppdm"), ("mnist", "daad"),
   ("cifar10", "igd")],
)  # fmt: skip
def test_one_class_configs_run_end_to_end_on_tfds(
  table, model, tmp_path, oneclass_tfds_dir, experiment_script
):
  script = experiment_script("reproduce_tables")
  result = script.main(
    [f"--table={table}", f"--model={model}", "--classes=7"]
    + [f"--args=data_dir={oneclass_tfds_dir};runlocal", f"--workroot={tmp_path}"]
    + [f"--out={tmp_path / 'out.json'}"]
  )
  run = result["runs"]["7"]
  # The protocol: class 7's 3 training images; the whole test split (2 per class), class 7 normal.
  assert (run["num_normal"], run["num_anomalous"]) == (2, 18)
  assert 0.0 <= run["image_AUROC"] <= 1.0 and result["mean"]["image_AUROC"] == run["image_AUROC"]
  with open(tmp_path / f"{table}_{model}" / "7" / "plan.json") as f:
    assert json.load(f)["train_records"] == 3
  assert result["paper"]["mean"].get("image_AUROC") == script.oneclass.PAPER[model].get(table)
