"""Bad input stops ``train_and_evaluate`` at start-up with a message naming the file or value,
and leaves the run directory's checkpoints and config exactly as they were.

Each test starts from a workdir holding a step-2 checkpoint (random values in the shapes of the
config's model, written without training) and its config.json, feeds the trainer one bad input
and checks the message, that every file of the workdir is byte-identical afterwards, and that
the checkpoint still restores to the saved values.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import types

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from dmad_jax import data as data_lib
from dmad_jax.configs import load_module
from dmad_jax.data import ImageReadError
from dmad_jax.models import get_detector
from dmad_jax.train import checkpoint, preflight, trainer
from dmad_jax.train import state as state_lib

CONFIGS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
digits_pdm = load_module(os.path.join(CONFIGS, "digits_pdm.py"))
folder_pdm = load_module(os.path.join(CONFIGS, "folder_pdm.py"))

SIZE = 32


def _abstract(config):
  """The config's TrainState structure, from the data config's shapes (no data, no
  compilation)."""
  spec = data_lib.element_spec(config.data)
  return state_lib.abstract(config, get_detector(config), spec)


def _digest(workdir) -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


class SavedRun:
  """A workdir with a step-2 checkpoint of ``config``'s model and its config.json."""

  def __init__(self, workdir, config):
    self.workdir, self.config = str(workdir), config
    rng = np.random.default_rng(0)
    self.abstract = _abstract(config)
    self.state = jax.tree.map(
      lambda a: (
        rng.standard_normal(a.shape).astype(a.dtype)
        if np.issubdtype(a.dtype, np.floating)
        else np.zeros(a.shape, a.dtype)
      ),
      self.abstract,
    )
    os.makedirs(self.workdir)
    trainer._write_config(config, self.workdir)
    mngr = checkpoint.manager(self.workdir)
    checkpoint.save(mngr, 2, self.state)
    mngr.wait_until_finished()
    self.digest = _digest(self.workdir)
    assert any(k.startswith("checkpoints/2/") for k in self.digest)

  def copy(self, workdir):
    """The same run copied to ``workdir`` (saving once per module keeps the tests fast)."""
    shutil.copytree(self.workdir, workdir)
    run = copy.copy(self)
    run.workdir = str(workdir)
    assert _digest(run.workdir) == self.digest
    return run

  def assert_intact(self):
    """Every file unchanged, and step 2 still restores to the saved values."""
    assert _digest(self.workdir) == self.digest
    mngr = checkpoint.manager(self.workdir, read_only=True)
    assert mngr.all_steps() == [2]
    restored = checkpoint.restore(mngr, 2, self.abstract)
    for a, b in zip(jax.tree.leaves(self.state), jax.tree.leaves(restored), strict=True):
      np.testing.assert_array_equal(a, np.asarray(b))


def _digits(**overrides):
  c = digits_pdm.get_config("runlocal")
  with c.unlocked():
    for key, value in overrides.items():
      target = c
      *parents, leaf = key.split(".")
      for p in parents:
        target = target[p]
      target[leaf] = value
  return c


@pytest.fixture(scope="module")
def digits_template(tmp_path_factory):
  return SavedRun(tmp_path_factory.mktemp("digits") / "run", _digits())


@pytest.fixture
def digits_run(tmp_path, digits_template):
  return digits_template.copy(tmp_path / "run")


def _write_images(folder, n, size=SIZE, start=0):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(start)
  for i in range(start, start + n):
    Image.fromarray(rng.integers(0, 256, (size, size), np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture
def folder_data(tmp_path):
  root = tmp_path / "data"
  _write_images(root / "train" / "good", 8)
  _write_images(root / "test" / "good", 2)
  _write_images(root / "test" / "crack", 2)
  return root


def _folder_config(root):
  return folder_pdm.get_config(f"root={root},image_size={SIZE},channels=1,runlocal")


@pytest.fixture(scope="module")
def folder_template(tmp_path_factory):
  # The model's shapes depend on the image size and channels only, not on the data root.
  return SavedRun(tmp_path_factory.mktemp("folder") / "run", _folder_config("/unused"))


@pytest.fixture
def folder_run(tmp_path, folder_template):
  return folder_template.copy(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------
def test_unknown_model_key_is_named_with_the_known_ones(digits_run):
  config = _digits(**{"model.chanels": (8, 8, 16, 16)})
  with pytest.raises(preflight.ConfigError, match="did you mean 'channels'") as info:
    trainer.train_and_evaluate(config, digits_run.workdir)
  msg = str(info.value)
  assert "unknown config key config.model.chanels" in msg and "num_codes" in msg
  digits_run.assert_intact()


def test_unknown_data_key_is_named(folder_run, folder_data):
  config = _folder_config(folder_data)
  with config.unlocked():
    config.data.validat = False
  with pytest.raises(ValueError, match="config.data.validat .*accepts: channels") as info:
    trainer.train_and_evaluate(config, folder_run.workdir)
  assert "validate" in str(info.value)
  folder_run.assert_intact()


def test_impossible_values_are_all_listed(digits_run):
  config = _digits(
    batch_size=0,
    seed=-1,
    nonfinite="ignore",
    param_dtype="float16",
    compute_dtype="float16",
    remat="everything",
    **{"data.image_size": 64},
  )
  with pytest.raises(preflight.ConfigError) as info:
    trainer.train_and_evaluate(config, digits_run.workdir)
  msg = str(info.value)
  for part in (
    "config.batch_size must be an int >= 1, got 0",
    "config.seed must be an int in [0, 2**32), got -1",
    "config.nonfinite must be one of ('stop', 'skip'), got 'ignore'",
    "config.param_dtype must be one of ('float32', 'float64'), got 'float16'",
    "config.compute_dtype must be one of float32, bfloat16, got 'float16'",
    "config.remat must be one of none, conv_outputs, got 'everything'",
    "config.data.image_size (64) and config.model.image_size (32) differ",
  ):
    assert part in msg
  digits_run.assert_intact()


def test_float64_without_64_bit_jax(digits_run):
  assert not jax.config.jax_enable_x64  # the test session runs in JAX's default 32-bit mode
  with pytest.raises(preflight.ConfigError, match="param_dtype 'float64' needs 64-bit JAX"):
    trainer.train_and_evaluate(_digits(param_dtype="float64"), digits_run.workdir)
  digits_run.assert_intact()


def test_image_size_not_divisible_by_the_model_depth(digits_run):
  config = _digits(**{"data.image_size": 36, "model.image_size": 36})
  with pytest.raises(ValueError, match=r"image_size 36 must be divisible by 2\*\*3"):
    trainer.train_and_evaluate(config, digits_run.workdir)
  digits_run.assert_intact()


def test_batch_size_not_divisible_by_the_device_count(digits_run, monkeypatch):
  # One CPU device here; a mesh of 3 stands in for a 3-device machine (the real 8-device case
  # runs in sharding_test.py).
  monkeypatch.setattr(
    trainer.sharding, "make_mesh", lambda spec=None: types.SimpleNamespace(shape={"data": 3})
  )
  with pytest.raises(ValueError, match="batch_size 8 is not divisible by the number of devices 3"):
    trainer.train_and_evaluate(_digits(), digits_run.workdir)
  digits_run.assert_intact()


def test_checkpoint_of_another_model_names_the_differences(tmp_path):
  other = SavedRun(tmp_path / "run", _digits(**{"model.num_codes": 4}))
  with pytest.raises(checkpoint.CheckpointMismatchError) as info:
    trainer.train_and_evaluate(_digits(), other.workdir)
  msg = str(info.value)
  assert f"the workdir {other.workdir} belongs to another model" in msg
  # The digits recipe's codebook is a moving average kept with the statistics.
  assert "batch_stats/vq/embed_sum: checkpoint (4, 16), this config (64, 16)" in msg
  assert "model.num_codes: 4 in the workdir's config, 64 now" in msg
  other.assert_intact()  # config.json included: it still describes the checkpoint's model


def test_checkpoint_of_a_same_shaped_other_model_is_restored_with_a_warning(tmp_path, caplog):
  # Other offset ranges and head strides: the same arrays, another model.
  other = SavedRun(
    tmp_path / "run",
    _digits(**{"model.max_offsets": (1.0, 1.0), "model.head_strides": ((2, 2, 2), (1, 1))}),
  )
  mngr = checkpoint.manager(other.workdir, read_only=True)
  with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
    state = checkpoint.restore(mngr, 2, other.abstract, config=_digits())
  chex.assert_trees_all_equal(state, other.state)
  (record,) = [r for r in caplog.records if "model-defining entries" in r.getMessage()]
  msg = record.getMessage()
  assert "model.max_offsets" in msg and "model.head_strides" in msg
  assert os.path.join(other.workdir, "config.json") in msg
  # The same config restores silently.
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
    checkpoint.restore(mngr, 2, other.abstract, config=other.config)
  assert not [r for r in caplog.records if "model-defining entries" in r.getMessage()]
  other.assert_intact()


# ---------------------------------------------------------------------------------------------
# Data files.
# ---------------------------------------------------------------------------------------------
def test_empty_training_folder(folder_run, folder_data):
  good = folder_data / "train" / "good"
  for f in good.iterdir():
    f.unlink()
  (good / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match="is empty") as info:
    trainer.train_and_evaluate(_folder_config(folder_data), folder_run.workdir)
  assert str(good) in str(info.value) and "ignored: notes.txt" in str(info.value)
  folder_run.assert_intact()


def test_truncated_image(folder_run, folder_data):
  bad = folder_data / "train" / "good" / "003.png"
  bad.write_bytes(bad.read_bytes()[:100])
  with pytest.raises(ImageReadError) as info:
    trainer.train_and_evaluate(_folder_config(folder_data), folder_run.workdir)
  assert info.value.path == str(bad) and str(bad) in str(info.value)
  folder_run.assert_intact()


def test_mask_of_another_size(folder_run, folder_data):
  gt = folder_data / "ground_truth" / "crack"
  gt.mkdir(parents=True)
  Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(gt / "000_mask.png")
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(gt / "001_mask.png")
  with pytest.raises(ImageReadError) as info:
    trainer.train_and_evaluate(_folder_config(folder_data), folder_run.workdir)
  msg = str(info.value)
  assert str(gt / "001_mask.png") in msg and str(folder_data / "test" / "crack" / "001.png") in msg
  assert "16x16" in msg and f"{SIZE}x{SIZE}" in msg
  folder_run.assert_intact()
