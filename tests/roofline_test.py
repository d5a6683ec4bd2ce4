"""experiments/roofline.py: the cost-analysis table on the smallest configs, and the stored one."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# One model of each kind (reconstruction with deformation, teacher-student, two players, a memory
# carried as state); the stored table below covers every model at its paper configuration.
SMALL = ("pdm_ped2", "ppdm", "daad_plus", "mnad_ped2")


@pytest.mark.slow  # traces and lowers the train and predict steps of four models
def test_roofline_on_the_smallest_configs(capsys, experiment_script):
  script = experiment_script("roofline")
  result = script.main(["--smallest", f"--models={','.join(SMALL)}"])
  rows = {r["model"]: r for r in result["rows"]}
  assert set(rows) == set(SMALL) and set(SMALL) <= set(script.MODELS)
  for name, r in rows.items():
    # The XLA formulations are costed (no opaque CPU-kernel call): training does more work than
    # prediction (backward pass and update), and every number is positive.
    assert r["train_flops"] > r["predict_flops"] > 0, name
    assert r["train_bytes"] > 0 and r["predict_bytes"] > 0, name
    assert r["gradient_bytes"] == 4 * r["parameters"] > 0, name
    # bfloat16 compute: about the same FLOPs, and fewer bytes in training (activations are
    # half as wide; the pre-fusion count also counts every cast, so predict steps of these tiny
    # configs need not show it).
    b = r["bfloat16"]
    assert b["train_flops"] == pytest.approx(r["train_flops"], rel=0.1), name
    assert b["train_bytes"] < r["train_bytes"], name
    for chip, spec in script.CHIPS.items():
      p = r["projection"][chip]
      lo = r["train_flops"] / spec["flops"]
      hi = max(lo, r["train_bytes"] / spec["hbm"])
      ar = 2 * 7 / 8 * r["gradient_bytes"] / spec["link"]
      assert p["train_step_s_lo"] == pytest.approx(lo) and p["train_step_s_hi"] == pytest.approx(hi)
      assert p["allreduce_s"] == pytest.approx(ar)
      assert p["efficiency"] == pytest.approx(lo / (lo + ar)) and 0 < p["efficiency"] <= 1
  assert "| pdm_ped2 |" in capsys.readouterr().out


def test_stored_table_covers_every_model_at_its_paper_configuration(experiment_script):
  script = experiment_script("roofline")
  with open(os.path.join(ROOT, "experiments", "results", "roofline.json")) as f:
    stored = json.load(f)
  assert stored["configs"] == "paper" and "projection" in stored["what"]
  assert {r["model"] for r in stored["rows"]} == set(script.MODELS)
  ped2 = next(r for r in stored["rows"] if r["model"] == "pdm_ped2")
  assert (ped2["batch_size"], ped2["image_size"]) == (8, 256)
  for r in stored["rows"]:  # both precisions, projected on every chip
    assert r["bfloat16"]["train_bytes"] < r["train_bytes"], r["model"]
    assert set(r["bfloat16"]["projection"]) == set(r["projection"]) == set(script.CHIPS)
