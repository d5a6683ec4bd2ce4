"""Detectors by name. Each exposes ``init``, ``loss`` and ``predict`` over data batches."""

from __future__ import annotations

MODEL_NAMES = ("pdm",)


def get_detector(config):
  """The detector named by ``config.model_name``."""
  name = config.model_name
  if name == "pdm":
    from dmad_jax.models.pdm import PDMDetector

    return PDMDetector(config)
  raise ValueError(f"unknown model_name {name!r}; known: {', '.join(MODEL_NAMES)}")
