"""Checks that need a GPU or TPU (marker ``gpu``): run by ``make accel-check`` on an accelerator
host (``experiments/accel_check.py``); on a CPU-only host every test here is skipped, and none
is counted as passed there."""

import os
import re

import jax
import numpy as np
import pytest

from dmad_jax.configs import load_module
from dmad_jax.train import trainer

pytestmark = [
  pytest.mark.gpu,
  pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU or TPU backend"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
digits_pdm = load_module(os.path.join(ROOT, "configs", "digits_pdm.py"))


def _config(**overrides):
  c = digits_pdm.get_config("runlocal")
  c.total_steps, c.checkpoint_every_steps = 3, 3
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _losses(workdir):
  import json

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_train_step_runs_on_the_accelerator_and_uses_no_cpu_kernel(tmp_path):
  """A 3-step run on the accelerator: the program lowered there holds no dmad_jax CPU kernel
  (what the accelerator runs does not depend on them), and its losses are finite."""
  from dmad_jax.train import export

  text = export.export_train_step(_config(), platforms=(jax.default_backend(),)).mlir_module()
  assert not re.search(r'custom_call\s*@dmad_|call_target_name\s*=\s*"dmad_', text)
  trainer.train_and_evaluate(_config(), str(tmp_path / "run"))
  assert np.all(np.isfinite(_losses(str(tmp_path / "run"))))


def test_sharded_step_over_every_local_device_matches_one_device(tmp_path):
  """Data parallelism over every local accelerator gives the one-device losses (float32
  summation order apart)."""
  n = jax.local_device_count()
  if n < 2:
    pytest.skip("one accelerator: nothing to shard over")
  one = str(tmp_path / "one")
  all_ = str(tmp_path / "all")
  trainer.train_and_evaluate(_config(batch_size=8 * n, mesh=[("data", 1)]), one)
  trainer.train_and_evaluate(_config(batch_size=8 * n, mesh=[("data", -1)]), all_)
  np.testing.assert_allclose(_losses(all_), _losses(one), rtol=1e-4)


def test_exported_predictor_round_trip_on_the_accelerator(tmp_path):
  """Train, calibrate, export for this platform, load the file and predict: the restored
  step's scores to 1e-4 and its decisions."""
  from dmad_jax import data as data_lib
  from dmad_jax.evaluation import calibration
  from dmad_jax.predict import Predictor

  config = _config()
  work = str(tmp_path / "run")
  trainer.train_and_evaluate(config, work)
  calibration.calibrate(config, work, 3)
  predictor = Predictor.from_workdir(work, 3)
  path = str(tmp_path / "model.dmad")
  predictor.export(path, (jax.default_backend(),))
  loaded = Predictor.from_exported(path)
  test = data_lib.get_source(config.data, "test")
  images = np.stack([test[i]["image"] for i in range(32)])
  want = predictor.predict_inputs(images)
  got = loaded.predict_inputs(images)
  np.testing.assert_allclose(got["scores"]["score"], want["scores"]["score"], rtol=1e-4, atol=1e-4)


def test_bfloat16_train_step_on_the_accelerator(tmp_path):
  """A 3-step run computing in bfloat16 on the accelerator (where bfloat16 is native): finite
  losses within 5% of the float32 run's from the same seed, and a float32 checkpoint."""
  f32, b16 = str(tmp_path / "f32"), str(tmp_path / "b16")
  trainer.train_and_evaluate(_config(), f32)
  trainer.train_and_evaluate(_config(compute_dtype="bfloat16"), b16)
  losses16 = _losses(b16)
  assert np.all(np.isfinite(losses16))
  np.testing.assert_allclose(losses16, _losses(f32), rtol=0.05)
  from dmad_jax.train import state as state_lib

  state = state_lib.state_at(_config(compute_dtype="bfloat16"), b16)
  kinds = {a.dtype for a in jax.tree.leaves(state.params)}
  assert kinds == {np.dtype(np.float32)}
