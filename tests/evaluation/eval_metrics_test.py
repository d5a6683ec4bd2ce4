"""Tests for dmad_jax.evaluation.metrics."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmad_jax.evaluation.calibration import f1_threshold
from dmad_jax.evaluation.metrics import auroc_report, image_auroc


def _pairwise_auroc(scores, labels):
  """Fraction of (anomalous, normal) pairs ordered correctly, ties counting 1/2."""
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  pos, neg = scores[labels == 1], scores[labels == 0]
  diff = pos[:, None] - neg[None, :]
  return float(((diff > 0) + 0.5 * (diff == 0)).mean())


# Scores drawn from a handful of integers so ties (within and across classes) are frequent.
_samples = st.lists(
  st.tuples(st.integers(0, 4), st.integers(0, 1)), min_size=2, max_size=40
).filter(lambda xs: len({label for _, label in xs}) == 2)


@given(_samples)
def test_auroc_matches_pairwise_with_ties(samples):
  scores = np.array([s for s, _ in samples], dtype=np.float32) * 0.25
  labels = np.array([label for _, label in samples])
  assert image_auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels), abs=1e-12)


@given(st.integers(0, 2**31 - 1))
def test_auroc_matches_pairwise_random_floats(seed):
  rng = np.random.default_rng(seed)
  labels = np.array([0, 1] + rng.integers(0, 2, size=30).tolist())
  scores = rng.normal(size=labels.size) + labels
  assert image_auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_perfect_inverted_and_bool_labels():
  labels = np.array([False, False, True, True])
  assert image_auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
  assert image_auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
  assert isinstance(image_auroc([1, 1, 1, 1], labels), float)


def test_auroc_one_class_reports_counts():
  with pytest.raises(ValueError, match=r"3 normal and 0 anomalous"):
    image_auroc([0.1, 0.2, 0.3], [0, 0, 0])
  with pytest.raises(ValueError, match=r"0 normal and 2 anomalous"):
    image_auroc([0.1, 0.2], [1, 1])


def test_auroc_non_finite_reports_count():
  with pytest.raises(ValueError, match=r"3 non-finite values of 5 \(2 NaN, 1 inf\)"):
    image_auroc([np.nan, 0.1, np.inf, np.nan, 0.3], [0, 1, 0, 1, 0])


def test_auroc_length_mismatch():
  with pytest.raises(ValueError, match=r"3 scores and 2 labels"):
    image_auroc([0.1, 0.2, 0.3], [0, 1])


def test_auroc_rejects_non_binary_labels():
  with pytest.raises(ValueError, match=r"0 \(normal\) or 1 \(anomalous\)"):
    image_auroc([0.1, 0.2, 0.3], [0, 1, 2])


def test_auroc_report_keys_and_values():
  labels = np.array([0, 0, 1, 1])
  report = auroc_report(
    {"score": np.array([0.1, 0.2, 0.8, 0.9]), "max": np.array([0.9, 0.8, 0.2, 0.1])}, labels
  )
  assert list(report) == ["image_AUROC", "image_AUROC_max"]
  assert report == {"image_AUROC": 1.0, "image_AUROC_max": 0.0}


def test_auroc_report_error_names_the_score():
  with pytest.raises(ValueError, match=r"score 'mean': .*1 non-finite"):
    auroc_report({"score": [0.1, 0.9], "mean": [np.nan, 0.9]}, [0, 1])


def test_f1_threshold_separable():
  # The one F1-optimal threshold of the package (calibration: anomalous iff score > threshold).
  scores = np.array([0.1, 0.3, 0.2, 0.7, 0.9, 0.8])
  labels = np.array([0, 0, 0, 1, 1, 1])
  threshold, at = f1_threshold(scores, labels)
  assert at["F1"] == pytest.approx(1.0)
  assert 0.3 < threshold < 0.7
  np.testing.assert_array_equal(scores > threshold, labels.astype(bool))


def test_f1_threshold_overlap_matches_brute_force():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, size=60)
  labels[:2] = [0, 1]
  scores = rng.normal(size=60) + labels
  threshold, at = f1_threshold(scores, labels)

  def f1_at(t):
    pred = scores >= t
    tp = int((pred & (labels == 1)).sum())
    return 2 * tp / (pred.sum() + labels.sum())

  best = max(f1_at(t) for t in np.unique(scores))
  assert at["F1"] == pytest.approx(best)
  assert f1_at(np.min(scores[scores > threshold])) == pytest.approx(at["F1"])


def test_f1_threshold_validates():
  with pytest.raises(ValueError, match=r"2 normal and 0 anomalous"):
    f1_threshold([0.1, 0.2], [0, 0])
