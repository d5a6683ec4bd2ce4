"""Image-level anomaly-detection metrics (NumPy + scikit-learn, no JAX).

Conventions used throughout: ``labels`` are 0 (normal) / 1 (anomalous) and ``scores`` are "higher
means more anomalous", so an AUROC of 1 means every anomalous image outscores every normal one.

The checks are strict on purpose: scikit-learn either raises a terse error (one class present) or
silently propagates NaN scores into a meaningless AUROC, and a diverged model that emits NaN is
exactly the case an evaluation must report rather than hide.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = ["auroc_report", "f1_optimal_threshold", "image_auroc"]


def _validate(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  """Flattens and checks ``scores`` / ``labels`` for the binary metrics below.

  Args:
    scores: Array-like of per-image anomaly scores, higher = more anomalous.
    labels: Array-like of the same length with 0 (normal) / 1 (anomalous) entries (bool allowed).

  Returns:
    ``(scores, labels)`` as 1-D float64 and int64 arrays.

  Raises:
    ValueError: If the lengths differ, labels are not all 0/1, scores contain NaN/inf, or only one
      class is present.
  """
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if scores.shape[0] != labels.shape[0]:
    raise ValueError(
      f"scores and labels must have the same length, got {scores.shape[0]} scores and "
      f"{labels.shape[0]} labels"
    )
  bad_labels = ~np.isin(labels, (0, 1))
  if bad_labels.any():
    raise ValueError(
      f"labels must be 0 (normal) or 1 (anomalous); found {int(bad_labels.sum())} other values, "
      f"e.g. {labels[bad_labels][:5].tolist()}"
    )
  labels = labels.astype(np.int64)
  non_finite = ~np.isfinite(scores)
  if non_finite.any():
    n_nan = int(np.isnan(scores).sum())
    raise ValueError(
      f"scores contain {int(non_finite.sum())} non-finite values of {scores.shape[0]} "
      f"({n_nan} NaN, {int(non_finite.sum()) - n_nan} inf)"
    )
  n_anomalous = int(labels.sum())
  n_normal = int(labels.shape[0] - n_anomalous)
  if n_normal == 0 or n_anomalous == 0:
    raise ValueError(
      "both classes are needed for a ranking metric, got "
      f"{n_normal} normal and {n_anomalous} anomalous samples"
    )
  return scores, labels


def image_auroc(scores, labels) -> float:
  """Image-level area under the ROC curve.

  Equals the probability that a random anomalous image scores higher than a random normal one,
  with ties counted as 1/2 (the Mann-Whitney U statistic).

  Args:
    scores: Array-like of N anomaly scores, higher = more anomalous.
    labels: Array-like of N labels, 1 = anomalous, 0 = normal.

  Returns:
    The AUROC as a Python float in [0, 1].

  Raises:
    ValueError: If the lengths differ, a label is not 0/1, a score is NaN/inf, or only one class
      is present (the message gives the counts).
  """
  scores, labels = _validate(scores, labels)
  return float(roc_auc_score(labels, scores))


def auroc_report(scores: Mapping[str, np.ndarray], labels) -> dict[str, float]:
  """AUROC of several score variants against the same labels.

  The main score (name ``"score"``) is reported as ``image_AUROC``; every other variant ``name``
  (e.g. ``"max"``, ``"mean"``) as ``image_AUROC_<name>``, so the keys can be logged side by side.

  Args:
    scores: Mapping from score name to an array of N scores, higher = more anomalous.
    labels: Array-like of N labels, 1 = anomalous, 0 = normal.

  Returns:
    Dict from metric key to AUROC, in the insertion order of ``scores``.

  Raises:
    ValueError: As `image_auroc`, with the offending score name prefixed to the message.
  """
  report = {}
  for name, values in scores.items():
    key = "image_AUROC" if name == "score" else f"image_AUROC_{name}"
    try:
      report[key] = image_auroc(values, labels)
    except ValueError as err:
      # Without the name, an error in one of several variants is hard to trace back.
      raise ValueError(f"score {name!r}: {err}") from err
  return report


def f1_optimal_threshold(scores, labels) -> tuple[float, float]:
  """Threshold on the scores that maximises the F1 of the anomalous class.

  Intended for turning scores into binary predictions: predict anomalous where
  ``score >= threshold``. Candidates are the distinct score values, as returned by
  `sklearn.metrics.precision_recall_curve`; choosing the threshold on the test labels is
  optimistic, so use it for visualisation or on a held-out split, not as a reported metric.

  Args:
    scores: Array-like of N anomaly scores, higher = more anomalous.
    labels: Array-like of N labels, 1 = anomalous, 0 = normal.

  Returns:
    ``(threshold, f1)`` as Python floats; ties in F1 resolve to the lowest such threshold.

  Raises:
    ValueError: As `image_auroc`.
  """
  scores, labels = _validate(scores, labels)
  precision, recall, thresholds = precision_recall_curve(labels, scores)
  # The last (precision, recall) pair is the (1, 0) end point with no threshold attached.
  precision, recall = precision[:-1], recall[:-1]
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
  best = int(np.argmax(f1))
  return float(thresholds[best]), float(f1[best])
