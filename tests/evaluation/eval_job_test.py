"""The eval job as a separate job: one compiled predict program for every checkpoint it watches,
and nothing of the training split read when the model keeps no training statistics."""

import builtins
import os

import numpy as np
import PIL.Image
import pytest

from dmad_jax import data as data_lib
from dmad_jax.configs import load_module
from dmad_jax.configs.schema import ConfigError
from dmad_jax.evaluation import job
from dmad_jax.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
digits_pdm = load_module(os.path.join(ROOT, "configs", "digits_pdm.py"))
folder_pdm = load_module(os.path.join(ROOT, "configs", "folder_pdm.py"))


@pytest.mark.slow
def test_watch_compiles_the_predict_program_once_for_three_checkpoints(tmp_path):
  config = digits_pdm.get_config("runlocal")
  config.total_steps, config.checkpoint_every_steps, config.keep_checkpoints = 3, 1, 3
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  evaluator = job.Evaluator(config, workdir)
  results = job.watch(config, workdir, poll_seconds=0.0, timeout_seconds=600, evaluator=evaluator)
  assert sorted(results) == [1, 2, 3]
  assert len({r["image_AUROC"] for r in results.values()}) > 1  # three different checkpoints
  # Traced once, and one executable in jit's cache: the three checkpoints shared one program.
  assert evaluator.runner.traces == 1
  assert evaluator.runner._jit._cache_size() == 1

  # Settings are compared on the validation split: the same job scores it into eval_validation/
  # (its own images, counts and scores), fits no threshold and leaves the test results alone.
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    test_metrics = f.read()
  config.eval.split = "validation"
  val = job.evaluate(config, workdir, 3)
  source = data_lib.get_source(config.data, "validation")
  assert (val["split"], val["num_test"]) == ("validation", len(source))
  assert (val["num_normal"], val["num_anomalous"]) == (
    int((source.labels == 0).sum()),
    int((source.labels == 1).sum()),
  )
  assert val["image_AUROC"] != results[3]["image_AUROC"] and "threshold" not in val
  with np.load(os.path.join(workdir, "eval_validation", "scores_3.npz")) as f:
    assert len(f["score"]) == len(source)
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    assert f.read() == test_metrics
  assert results[3]["split"] == "test" and "threshold_FPR" in results[3]
  config.eval.test_selected = True
  with pytest.raises(ConfigError, match="test_selected.*eval.split='test'"):
    job.Evaluator(config, workdir)

  # figure_samples = 0 draws no per-record pictures (the metrics and the histogram stay).
  config.eval.test_selected = False
  config.eval.figure_samples = 0
  quiet = job.evaluate(config, workdir, 2)
  outdir = os.path.join(workdir, "eval_validation")
  assert "panel" not in quiet and os.path.exists(quiet["histogram"])
  assert not os.path.exists(os.path.join(outdir, "panel_2.png"))
  assert os.path.exists(os.path.join(outdir, "panel_3.png"))
  assert quiet["num_test"] == len(source)
  config.eval.figure_samples = -1
  with pytest.raises(ConfigError, match="figure_samples.*got -1"):
    job.Evaluator(config, workdir)


def _write_folder(root, n_train=8):
  rng = np.random.default_rng(0)
  for split, folder, n in (("train", "good", n_train), ("test", "good", 3), ("test", "bad", 3)):
    (root / split / folder).mkdir(parents=True)
    for i in range(n):
      img = rng.integers(0, 100 if folder == "good" else 256, (32, 32), np.uint8)
      PIL.Image.fromarray(img).save(root / split / folder / f"{i}.png")


@pytest.mark.slow
def test_eval_job_opens_no_file_of_the_training_split(tmp_path, monkeypatch):
  root = tmp_path / "data"
  _write_folder(root)
  config = folder_pdm.get_config(f"root={root},image_size=32,channels=1,runlocal")
  with config.unlocked():
    del config["calibration"]  # a threshold from the training images would read them
  config.total_steps = 1
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)

  # Training files made unreadable, and every open of a file under train/ recorded.
  train_dir = str(root / "train")
  for name in os.listdir(os.path.join(train_dir, "good")):
    with open(os.path.join(train_dir, "good", name), "wb") as f:
      f.write(b"not an image")
  opened = []
  real_open, real_pil_open = builtins.open, PIL.Image.open

  def record(path):
    if isinstance(path, str | os.PathLike) and os.fspath(path).startswith(train_dir):
      opened.append(os.fspath(path))

  def spy_open(file, *args, **kwargs):
    record(file)
    return real_open(file, *args, **kwargs)

  def spy_pil_open(fp, *args, **kwargs):
    record(fp)
    return real_pil_open(fp, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", spy_open)
  monkeypatch.setattr(PIL.Image, "open", spy_pil_open)
  result = job.evaluate(config, workdir)
  assert result["num_test"] == 6 and 0.0 <= result["image_AUROC"] <= 1.0
  assert opened == []


def test_on_split_is_a_copy_that_scores_another_split_without_pictures():
  config = digits_pdm.get_config("runlocal")
  assert config.eval.split == "test" and config.eval.figure_samples > 0
  before = config.to_dict()
  other = job.on_split(config, "validation")
  assert (other.eval.split, other.eval.figure_samples) == ("validation", 0)
  assert config.to_dict() == before  # the given config is left as it is
  other.eval.split, other.eval.figure_samples = "test", config.eval.figure_samples
  assert other.to_dict() == before  # and nothing else differs
