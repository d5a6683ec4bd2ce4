"""Durations in epochs of the training split or in steps, converted once from the data size."""

import json
import os

import ml_collections
import pytest

from dmad_jax import configs
from dmad_jax.train import durations

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**kw):
  return ml_collections.ConfigDict({"batch_size": 8, **kw})


def test_epochs_become_steps_from_the_training_split_size():
  c = _config(total_epochs=100.0, checkpoint_every_epochs=10.0, log_every_steps=100)
  for records, steps, every in ((50, 625, 63), (5000, 62500, 6250), (7, 88, 9)):
    plan = durations.plan(c, records)
    assert (plan.total_steps, plan.checkpoint_every_steps, plan.log_every_steps) == (
      steps,
      every,
      100,
    )
    assert plan.epochs == pytest.approx(100.0, rel=0.02)
  # Steps are taken as given, whatever the data size; defaults fill what is missing.
  plan = durations.plan(_config(total_steps=600), 50)
  assert (plan.total_steps, plan.log_every_steps, plan.checkpoint_every_steps) == (600, 50, 1000)
  assert plan.describe() == (
    "600 steps of batch 8 = 96 epochs of 50 training records; log every 50 steps, checkpoint "
    "every 1000"
  )


def test_folder_pdm_trains_any_folder_for_the_same_number_of_passes():
  c = configs.load(os.path.join(ROOT, "configs", "folder_pdm.py"), "root=/d,image_size=32")
  assert durations.plan(c, 50).total_steps == 625
  assert durations.plan(c, 5000).total_steps == 62500


def test_bad_durations_are_named():
  assert durations.check(_config()) == ["config.total_steps or config.total_epochs is required"]
  assert durations.check(_config(total_steps=0)) == [
    "config.total_steps must be an int >= 1, got 0"
  ]
  (both,) = durations.check(_config(total_steps=5, total_epochs=2.0))
  assert "both set: give one" in both


def test_final_step_of_a_run_in_epochs_comes_from_the_trainers_plan(tmp_path):
  c = _config(total_epochs=2.0)
  assert durations.final_step(c, str(tmp_path)) is None  # no trainer has planned it yet
  durations.save(str(tmp_path), durations.plan(c, 12))
  assert durations.final_step(c, str(tmp_path)) == 3  # 2 epochs of 12 records, batch 8
  with open(tmp_path / durations.PLAN_FILE) as f:
    assert json.load(f)["epochs"] == pytest.approx(2.0)
  assert durations.final_step(_config(total_steps=7), str(tmp_path)) == 7


def test_refit_every_is_a_duration_and_never_by_default():
  assert durations.plan(_config(total_steps=10), 50).refit_every_steps == 0
  plan = durations.plan(_config(total_epochs=100.0, refit_every_epochs=10.0), 50)
  assert plan.refit_every_steps == 63  # 10 epochs of 50 records in batches of 8
  assert plan.describe().endswith(", refit every 63")
  (bad,) = durations.check(_config(total_steps=5, refit_every_steps=0))
  assert bad == "config.refit_every_steps must be an int >= 1, got 0"
