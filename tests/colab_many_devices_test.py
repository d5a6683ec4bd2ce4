"""The many-devices notebook runs top to bottom on 8 CPU devices (small settings): a train step
sharded over all of them, and over a 2 x 4 data x fsdp mesh, computes the one-device loss, VQ
perplexity and BatchNorm statistics."""

import pytest


@pytest.mark.multidevice
def test_many_devices_notebook(run_notebook):
  summary, pictures = run_notebook("many_devices.ipynb")
  assert summary["small"] and summary["platform"] == "cpu" and summary["accelerator"] is None
  assert summary["device_count"] == 8
  assert summary["meshes"] == {
    "all devices": {"data": 8},
    "fsdp": {"data": 2, "fsdp": 4},
    "one device": {"data": 1},
  }
  assert summary["rows_per_device"] * 8 == summary["batch_size"]
  # FSDP splits some parameters (and their Adam moments), never the BatchNorm statistics.
  split = summary["fsdp_split_leaves"]
  assert 0 < summary["fsdp_split_params"] == split["params"] < summary["params_leaves"]
  # Of the statistics only the EMA codebook (64 codes x 16 values) reaches fsdp_min_size.
  assert split["batch_stats"] == 1 and split["opt_state"] == 2 * split["params"]

  one_loss, one_perplexity = summary["loss"]["one device"], summary["perplexity"]["one device"]
  for name in ("all devices", "fsdp"):
    assert summary["loss"][name] == pytest.approx(one_loss, rel=1e-6), name
    assert summary["perplexity"][name] == pytest.approx(one_perplexity, rel=1e-6), name
    diff = summary["against_one_device"][name]
    assert diff["loss_rel_diff"] <= 1e-6 and diff["perplexity_rel_diff"] <= 1e-6, name
    assert diff["batch_stats_max_abs_diff"] <= 1e-5, name
  # The statistics did move in the step, and those of one device's rows alone differ from the
  # global batch's by far more than the sharded step's do.
  sharded = summary["against_one_device"]["all devices"]["batch_stats_max_abs_diff"]
  assert summary["batch_stats_max_abs_change"] > 1e-3
  assert summary["device0_rows_alone"]["batch_stats_max_abs_diff"] > 100 * sharded
  assert 1.0 <= one_perplexity <= 8  # the runlocal code book has 8 codes

  # The same step in bfloat16 compute: its loss within bfloat16's precision of float32's.
  assert 0 < summary["bfloat16"]["loss_rel_diff_to_float32"] < 1e-2
  train = summary["train"]
  assert train["steps"] == 2 and [r["step"] for r in train["log"]] == [1, 2]
  # train_and_evaluate's first step is the step above: same batch, same state.
  assert train["log"][0]["loss"] == pytest.approx(summary["loss"]["all devices"], rel=1e-6)
  assert pictures == 2  # the BatchNorm scatter plots and the loss curve
