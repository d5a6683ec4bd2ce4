"""How a stored calibration maps scores and pixel maps to [0, 1] (pure NumPy, no model code):
shared by the calibration, :class:`dmad_jax.predict.Predictor` and the exported model's loader
(:mod:`dmad_jax.exported`), which must run without Flax."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def normalize_scores(scores, calibration: Mapping) -> np.ndarray:
  """Scores mapped so that the threshold is 0.5 and the calibration split's score range has width
  1 (``dmad_jax.evaluation.calibration``), clipped to [0, 1]."""
  width = calibration["score_max"] - calibration["score_min"]
  width = width if width > 0 else 1.0
  x = (np.asarray(scores, np.float64) - calibration["threshold"]) / width + 0.5
  return np.clip(x, 0.0, 1.0)


def normalize_maps(maps, calibration: Mapping) -> np.ndarray:
  """Pixel maps scaled by the normal maps' range of the calibration split, clipped to [0, 1]."""
  lo, hi = calibration["map_min"], calibration["map_max"]
  width = hi - lo if hi > lo else 1.0
  return np.clip((np.asarray(maps, np.float32) - lo) / width, 0.0, 1.0)
