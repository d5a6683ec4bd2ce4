"""The classical baselines the eval job reports next to a model (dmad_jax.evaluation.baselines)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from dmad_jax.evaluation import baselines


def test_every_baseline_separates_another_digit_from_the_normal_one():
  """scikit-learn's real digits: trained on 0s, every baseline ranks 1s above unseen 0s."""
  x, y = load_digits(return_X_y=True)
  x = x / 8.0 - 1.0  # 0..16 -> [-1, 1]
  zeros, ones = x[y == 0], x[y == 1]
  train, test = zeros[:120], np.concatenate([zeros[120:], ones[:60]])
  labels = np.r_[np.zeros(len(zeros) - 120), np.ones(60)]
  out = baselines.scores(train, test)
  assert set(out) == set(baselines.BASELINES)
  for name, s in out.items():
    assert s.shape == (len(test),) and np.all(np.isfinite(s)), name
    assert roc_auc_score(labels, s) > 0.95, (name, roc_auc_score(labels, s))


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="do not match"):
    baselines.scores(np.zeros((4, 3)), np.zeros((2, 5)))
  with pytest.raises(ValueError, match="unknown \\['lof'\\]"):
    baselines.scores(np.zeros((4, 3)), np.zeros((2, 3)), names=("lof",))
