"""train_and_evaluate and the eval job end to end on the runlocal digits config."""

import json
import os

import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dmad_jax.configs import load_module
from dmad_jax.evaluation import job
from dmad_jax.train import checkpoint, trainer
from dmad_jax.train import state as state_lib

CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
digits_pdm = load_module(os.path.join(CONFIGS, "digits_pdm.py"))


def _config(**overrides):
  c = digits_pdm.get_config("runlocal")
  with c.unlocked():
    for k, v in overrides.items():
      setattr(c, k, v)
  return c


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _params(workdir, config, step):
  return state_lib.variables_at(config, workdir, step)["params"]


@pytest.mark.slow
def test_one_step_train_then_eval(tmp_path):
  workdir = str(tmp_path / "run")
  config = _config(total_steps=1)
  state = trainer.train_and_evaluate(config, workdir)
  assert int(state.step) == 1
  assert checkpoint.manager(workdir, read_only=True).all_steps() == [1]
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert rows[-1]["step"] == 1 and np.isfinite(rows[-1]["loss"])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))

  config.eval.baselines = True  # the classical detectors on the same split, next to the model
  result = job.evaluate(config, workdir)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    written = json.load(f)
  assert written["step"] == 1 and written["num_test"] == result["num_test"]
  for name in ("kde", "knn", "pca", "ocsvm", "iforest"):
    assert 0.5 < written[f"baseline_image_AUROC_{name}"] <= 1.0, name
  # Every test image scored exactly once although 540 is not a multiple of the batch (64).
  scores = np.load(os.path.join(workdir, "eval", "scores_1.npz"))
  n_test = len(trainer.data_lib.get_source(config.data, "test"))
  assert n_test % config.eval.batch_size != 0
  assert sorted(scores["index"].tolist()) == list(range(n_test))
  # The reported AUROC is scikit-learn's on the same scores.
  assert written["image_AUROC"] == pytest.approx(roc_auc_score(scores["labels"], scores["score"]))
  assert written["image_AUROC_rec"] == pytest.approx(roc_auc_score(scores["labels"], scores["rec"]))
  for name in ("panel_1.png", "histogram_1.png", "metrics_1.json"):
    assert os.path.getsize(os.path.join(workdir, "eval", name)) > 0


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(tmp_path):
  config = _config(total_steps=4, checkpoint_every_steps=2)
  full = str(tmp_path / "full")
  trainer.train_and_evaluate(config, full)
  final = _params(full, config, 4)

  # A run that stopped after its step-2 checkpoint: the same workdir minus step 4 (a copy: a
  # second identical run writes the same files, which reliability_test.py asserts bit for bit).
  part = str(tmp_path / "part")
  import shutil

  shutil.copytree(full, part)
  shutil.rmtree(os.path.join(part, "checkpoints", "4"))
  assert checkpoint.manager(part, read_only=True).latest_step() == 2
  state = trainer.train_and_evaluate(config, part)
  assert int(state.step) == 4
  resumed_steps = [r["step"] for r in _read_jsonl(os.path.join(part, "metrics.jsonl"))]
  assert resumed_steps == [1, 2, 3, 4, 3, 4]  # the rerun logged steps 3 and 4 only
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(_params(part, config, 4)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = _config(total_steps=2)
  trainer.train_and_evaluate(config, workdir)
  good = _params(workdir, config, 2)

  real = trainer.get_detector

  def poisoned(cfg):
    det = real(cfg)
    loss = det.loss

    def nan_loss(params, batch_stats, batch, rng):
      total, aux = loss(params, batch_stats, batch, rng)
      return total * np.nan, aux

    det.loss = nan_loss
    return det

  monkeypatch.setattr(trainer, "get_detector", poisoned)
  with pytest.raises(trainer.NonFiniteLossError, match="step 3.*last checkpoint is step 2"):
    trainer.train_and_evaluate(_config(total_steps=4), workdir)
  assert checkpoint.manager(workdir, read_only=True).latest_step() == 2
  kept = _params(workdir, config, 2)
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(kept), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mesh_larger_than_the_machine_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="needs 3 devices, 1 available"):
    trainer.train_and_evaluate(_config(mesh=[("data", 3)]), str(tmp_path / "run"))


def test_eval_without_checkpoint_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*checkpoints"):
    job.evaluate(_config(), str(tmp_path / "empty"))


@pytest.mark.slow
def test_watch_evaluates_every_checkpoint_until_the_last(tmp_path):
  workdir = str(tmp_path / "run")
  config = _config(total_steps=2, checkpoint_every_steps=1)
  trainer.train_and_evaluate(config, workdir)
  results = job.watch(config, workdir, poll_seconds=0.0, timeout_seconds=60)
  assert sorted(results) == [1, 2]
  for step in (1, 2):
    assert os.path.exists(os.path.join(workdir, "eval", f"metrics_{step}.json"))


def test_template_initialised_from_an_image_file(tmp_path):
  from PIL import Image

  img = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
  Image.fromarray(img).save(tmp_path / "bkg.png")
  config = _config(template_init=str(tmp_path / "bkg.png"))
  source = trainer.data_lib.get_source(config.data, "train")
  template = trainer.data_init_value(trainer.get_detector(config), source)
  np.testing.assert_allclose(template[..., 0], img / 127.5 - 1, atol=1e-6)
  median_config = _config(template_init="median")
  median = trainer.data_init_value(trainer.get_detector(median_config), source)
  assert median.shape == (32, 32, 1) and -1 <= median.min() and median.max() <= 1


@pytest.mark.slow
def test_checkpoint_beyond_total_steps_is_an_error(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(_config(total_steps=2), workdir)
  with pytest.raises(ValueError, match="holds step 2, beyond the 1 steps this config plans"):
    trainer.train_and_evaluate(_config(total_steps=1), workdir)
