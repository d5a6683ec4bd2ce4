"""The notebooks of colab/ run top to bottom (small settings) and compute what they show."""

import glob
import os
import re
import sys

import nbformat
import pytest


@pytest.mark.slow
def test_quickstart_notebook(run_notebook):
  summary, pictures = run_notebook("quickstart.ipynb")
  assert summary["step"] == 2 and 0.0 <= summary["image_AUROC"] <= 1.0
  # The classical baselines of the same split and the held-out threshold are reported with it.
  assert {"baseline_image_AUROC_knn", "baseline_image_AUROC_kde"} <= set(summary)
  assert 0.0 <= summary["threshold_FPR"] <= 1.0
  assert pictures == 2  # the deformation panel and the score histogram


@pytest.mark.slow
def test_functional_api_notebook(run_notebook):
  summary, pictures = run_notebook("functional_api.ipynb")
  # grid_sample: zero offsets give the image back; a shift is recovered through its gradient.
  assert summary["identity_warp_max_error"] < 1e-4
  assert summary["recovered_shift_error"] < 1e-3
  # Straight-through VQ: the upstream gradient reaches the encoder unchanged, the lookup has none.
  assert summary["straight_through_grad_norm"] > 1.0
  assert summary["straight_through_grad_equals_upstream"] is True
  assert summary["plain_lookup_grad_norm"] == 0.0
  # DAAD's read: shrinkage leaves a few items per block, with weights that sum to one.
  assert 1.0 <= summary["memory_items_read_per_block_mean"] < 8.0
  assert summary["memory_weights_sum_to_one"] is True
  # The detector written in the notebook and DMAD-PDM, trained and evaluated on the same split.
  new, pdm = summary["notebook_vq_deform"], summary["pdm"]
  assert new["step"] == pdm["step"] == 60 and new["num_test"] == pdm["num_test"] > 0
  assert pdm["image_AUROC"] > 0.6  # above chance after 60 steps of the tiny model
  assert 0.0 <= new["image_AUROC"] <= 1.0 and "image_AUROC_deformation" in new
  assert pictures >= 6  # the warps, the descent, VQ, the memory read, both eval panels


@pytest.mark.slow
def test_own_images_notebook(run_notebook):
  summary, pictures = run_notebook("own_images.ipynb")
  # After 40 steps of the tiny model the painted defects already stand out in the pixel maps
  # (the image AUROC of 6 defective and 4 normal crops is too coarse to assert on at this size).
  assert summary["step"] == 40
  assert 0.0 <= summary["image_AUROC"] <= 1.0
  assert summary["pixel_AUROC"] > 0.6 and 0.0 < summary["pixel_AUPRO"] <= 1.0
  # The threshold comes from the normal images kept out of training (validation/good: 2 crops).
  assert summary["threshold_split"] == "validation" and summary["threshold_num_normal"] == 2
  assert 0.0 <= summary["threshold_FPR"] <= 1.0
  # Predictor on new images, and the exported file gives the same scores and decisions.
  assert len(summary["new_scores"]) == 6 and len(summary["new_is_anomalous"]) == 6
  assert summary["export_max_score_difference"] < 1e-5
  assert pictures >= 4  # the data, the heatmaps, the histogram, the new images


def test_every_committed_notebook_holds_a_complete_run():
  """The notebooks are committed with the outputs of a full run (colab/execute.py): every code
  cell executed in order, no error, the pictures stored."""
  paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "colab", "*.ipynb")))
  assert len(paths) >= 5
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), path
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], path
    pictures = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert pictures >= 2, path
    # Paths in the outputs are relative to the repository, not the machine the run was made on.
    texts = [
      str(o.get("text", "")) + str({k: v for k, v in o.get("data", {}).items() if "image" not in k})
      for c in code
      for o in c.outputs
    ]
    absolute = [m for t in texts for m in re.findall(r"/[\w.-]+(?:/[\w.-]+)*/runs/[\w./-]+", t)]
    assert not absolute, (path, absolute[:3])


def test_execute_rewrites_the_checkout_paths_as_repository_relative(tmp_path):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "colab"))
  try:
    import execute
  finally:
    sys.path.pop(0)
  root = str(tmp_path / "checkout")
  nb = nbformat.v4.new_notebook()
  cell = nbformat.v4.new_code_cell("print(1)")
  cell.outputs = [
    nbformat.v4.new_output(
      "stream", name="stderr", text=f"eval: {root}/runs/demo/eval/x.png\nrepo: {root}\n"
    ),
    nbformat.v4.new_output(
      "execute_result",
      data={"text/plain": f"'{root}/runs/demo'", "image/png": f"{root}/not-text"},
      execution_count=1,
    ),
  ]
  nb.cells.append(cell)
  nb.cells.append(nbformat.v4.new_code_cell("print(2)"))
  nb.cells[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{root}-other\n")]
  assert execute.repo_relative(nb, root) == 3
  assert cell.outputs[0]["text"] == "eval: runs/demo/eval/x.png\nrepo: .\n"
  assert nb.cells[-1].outputs[0]["text"] == f"{root}-other\n"  # another folder: left alone
  assert cell.outputs[1]["data"]["text/plain"] == "'runs/demo'"
  assert cell.outputs[1]["data"]["image/png"] == f"{root}/not-text"  # pictures are left alone
