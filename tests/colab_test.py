"""The quickstart notebook runs top to bottom (tiny config) and produces its figure."""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("DMAD_QUICKSTART_ARG", "runlocal")
  monkeypatch.setenv("DMAD_QUICKSTART_STEPS", "2")
  monkeypatch.setenv("DMAD_QUICKSTART_WORKDIR", str(tmp_path / "run"))
  monkeypatch.delenv("DMAD_REPO", raising=False)  # found from the working directory, colab/
  nb = nbformat.read(os.path.join(ROOT, "colab", "quickstart.ipynb"), as_version=4)
  NotebookClient(
    nb,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": os.path.join(ROOT, "colab")}},
  ).execute()
  with open(tmp_path / "run" / "eval" / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics["step"] == 2 and 0.0 <= metrics["image_AUROC"] <= 1.0
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs)  # the panel was displayed
