"""Anomaly scores and heatmaps of new images from a trained run: :class:`Predictor` and
``dmad predict --workdir DIR IMAGES... --out DIR [--step N]``.

``Predictor.from_workdir(workdir, step=None)`` rebuilds the model from the run's ``config.json``
(written by the trainer), restores the checkpoint step and reads the step's stored calibration
(``checkpoints/<step>/calibration.json``, see :mod:`dmad_jax.evaluation.calibration`): the
preprocessing of the training data source, the threshold and the normalisation. So a restored
step predicts what the eval job saw:

* the same preprocessing as the data sources (:mod:`dmad_jax.data.images`): files through
  ``load_image``, arrays through ``prepare_array`` (gray/RGB to the stored channel count, PIL
  bilinear resize to the stored size), then ``to_unit_range`` to [-1, 1];
* the same model function (``detector.predict``) through the same inference runner as the eval
  job, in batches of ``config.eval.batch_size``, the last one padded with zero images, so an
  image's score does not depend on which images share its batch;
* the stored threshold (``score > threshold`` is anomalous) and score normalisation
  (threshold at 0.5).

Arrays: ``predictor(images)`` takes ``(N, H, W)`` or ``(N, H, W, C)`` arrays (C = 1, 3 or 4;
alpha is dropped; a 3-d array ending in 1, 3 or 4 is refused as a likely single image), or a
list of ``(H, W[, C])`` images of any sizes. uint8 pixels are used as decoded; floating-point
pixels must lie in [0, 1] and are rounded to 8 bits first, which is what an 8-bit image file of
the same picture gives. Video detectors (``t_length > 1``) are not
supported: their inputs are clips, not images.

The predictor runs in one process, on every local device (data parallel); parameters are
replicated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmad_jax import exported as exported_lib
from dmad_jax.data import base as data_base
from dmad_jax.evaluation import calibration as cal_lib
from dmad_jax.evaluation.inference import Runner
from dmad_jax.models import get_detector
from dmad_jax.ops import cpu_kernels
from dmad_jax.predictions import (  # noqa: F401  (part of this module's interface)
  PREDICTIONS_CSV,
  PREDICTIONS_JSON,
  ImagePredictor,
  expand_paths,
  print_summary,
  write_predictions,
)
from dmad_jax.train import checkpoint, sharding
from dmad_jax.train import state as state_lib

log = logging.getLogger("dmad_jax")


# The run's config from <workdir>/config.json (lists read back as tuples).
load_config = state_lib.load_run_config


def _missing_calibration(workdir: str, step: int) -> str:
  return (
    f"checkpoint step {step} in {checkpoint.checkpoint_dir(workdir)} has no calibration "
    f"({cal_lib.CALIBRATION_FILE}): create it with `dmad calibrate --workdir {workdir} --step "
    f"{step}` (the run's config.json; add --config FILE to choose the split and method, e.g. "
    "--config.calibration.split=validation), or run `dmad eval` with a config that has a "
    "calibration section"
  )


class Predictor(ImagePredictor):
  """A restored checkpoint step with its preprocessing and calibration; call it on images.

  Attributes:
    config: the run's config.
    workdir: the run directory.
    step: the restored checkpoint step.
    calibration: the stored calibration record, or None (``require_calibration=False``).
    preprocessing: ``{"image_size", "channels", "value_range", "resize", "source"}``.
    pixel_key: the detector's pixel map shown in heatmaps.
    batch_size: images per model call (``config.eval.batch_size``).
  """

  def __init__(self, config, workdir: str, step: int, calibration: Mapping | None):
    """Restores ``step`` of ``workdir``; prefer :meth:`from_workdir`.

    Raises:
      ValueError: for a video config, or a stored preprocessing that does not match the config.
      CheckpointMismatchError: when the checkpoint does not fit the config's model.
    """
    if int(config.get("t_length", 1)) != 1 or config.data.name == "video":
      raise ValueError(
        f"predict works on single images; the run in {workdir} is a video model (t_length "
        f"{config.get('t_length', 1)}, data {config.data.name!r}) whose inputs are clips"
      )
    self.config, self.workdir, self.step = config, os.path.abspath(workdir), int(step)
    self.calibration = None if calibration is None else dict(calibration)
    expected = cal_lib.preprocessing(config)
    stored = expected if calibration is None else calibration["preprocessing"]
    for key in ("image_size", "channels"):
      if stored[key] != expected[key]:
        raise ValueError(
          f"the calibration of step {step} was stored with {key}={stored[key]} but the run's "
          f"config.json says {expected[key]}: recalibrate with `dmad calibrate --workdir {workdir}`"
        )
    self.preprocessing = dict(stored)
    self.batch_size = int(config.get("eval", {}).get("batch_size", 64))
    mesh = sharding.make_mesh(None)
    size, ch = self.preprocessing["image_size"], self.preprocessing["channels"]
    detector = get_detector(config)
    spec = data_base.record_spec((size, size, ch))
    self._variables, var_sh = state_lib.restore_variables(
      config, detector, spec, self.workdir, self.step, mesh
    )
    self.pixel_key = detector.pixel_map
    self._detector = detector

    def predict(variables, batch):
      out = detector.predict(variables, batch)
      return {"scores": out.scores, "maps": out.maps}  # Pictures are not needed.

    self._runner = Runner(predict, mesh=mesh, variables_sharding=var_sh, batch_size=self.batch_size)

  @staticmethod
  def from_exported(path: str) -> exported_lib.ExportedPredictor:
    """The predictor of a ``dmad export`` file (:mod:`dmad_jax.exported`; loading it needs
    neither Flax nor the model code: use ``dmad_jax.exported.load`` where they are absent)."""
    return exported_lib.load(path)

  @classmethod
  def from_workdir(
    cls, workdir: str, step: int | None = None, *, require_calibration: bool = True
  ) -> Predictor:
    """The predictor of ``step`` (default: the latest) of a training run directory.

    Args:
      workdir: the run directory (``config.json`` and ``checkpoints/``).
      step: checkpoint step; None = the latest.
      require_calibration: when False, a step without calibration still predicts raw scores
        and maps (``normalized_score`` and ``is_anomalous`` are then None).

    Raises:
      FileNotFoundError: no ``config.json``, no checkpoint (or not ``step``).
      CalibrationMissingError: the step has no calibration (the message says how to make it).
    """
    workdir = os.path.abspath(workdir)
    config = load_config(workdir)
    step = checkpoint.latest_step(workdir, step)
    calibration = cal_lib.load(workdir, step)
    if calibration is None and require_calibration:
      raise cal_lib.CalibrationMissingError(_missing_calibration(workdir, step))
    return cls(config, workdir, step, calibration)

  # -- prediction ----------------------------------------------------------------------------
  def predict_inputs(self, inputs: np.ndarray) -> dict:
    """Detector outputs for model inputs ``(N, S, S, C)`` in [-1, 1].

    Returns:
      ``{"scores": {name: (N,)}, "maps": {name: (N, S, S)}}`` as NumPy arrays.
    """
    inputs = np.asarray(inputs, np.float32)
    size, ch = self.preprocessing["image_size"], self.preprocessing["channels"]
    if inputs.ndim != 4 or inputs.shape[1:] != (size, size, ch):
      raise ValueError(f"inputs must be (N, {size}, {size}, {ch}), got {inputs.shape}")
    return self._runner.on_arrays(self._variables, {"image": inputs})

  def source(self) -> dict:
    return {"workdir": self.workdir}

  # -- export ----------------------------------------------------------------------------------
  def export(self, path: str, platforms: Sequence[str] = ("cpu",)) -> dict:
    """Writes this step as one portable file (:mod:`dmad_jax.exported`): preprocessing from
    uint8 pixels, the detector's ``predict`` (image scores and pixel maps) with the variables
    as constants, exported with ``jax.export`` for ``platforms`` and a symbolic batch size, next
    to the calibration, the preprocessing and the run's config.

    The program holds no dmad_jax CPU kernel (``cpu_kernels.lowering_for(..., kernels=False)``),
    so it runs where dmad_jax is not installed.

    Returns:
      The file's metadata record.
    """
    platforms = tuple(platforms)
    # Host copies as jax arrays (constants of the program; numpy arrays would be indexed by
    # tracers inside the model).
    variables = jax.tree.map(jnp.asarray, jax.device_get(self._variables))
    detector = self._detector
    size, ch = self.preprocessing["image_size"], self.preprocessing["channels"]

    def program(pixels):
      x = pixels.astype(jnp.float32) / 127.5 - 1.0  # images.to_unit_range
      out = detector.predict(variables, {"image": x})
      return {"scores": out.scores, "maps": out.maps}

    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, size, size, ch), jnp.uint8)
    with cpu_kernels.lowering_for(platforms, kernels=False):
      program_export = jax.export.export(jax.jit(program), platforms=platforms)(spec)
    meta = exported_lib.metadata(
      config=json.loads(self.config.to_json_best_effort()),
      step=self.step,
      workdir=self.workdir,
      preprocessing=self.preprocessing,
      calibration=self.calibration,
      pixel_key=self.pixel_key,
      platforms=platforms,
    )
    exported_lib.write(path, meta, program_export.serialize())
    return meta


def predict_command(workdir: str, paths: Sequence[str], out_dir: str, step: int | None) -> dict:
  """``dmad predict``: restores the step, predicts the files, writes the outputs, prints a
  summary. Errors (unreadable image, no checkpoint, no calibration) raise before any output."""
  paths = expand_paths(paths)
  predictor = Predictor.from_workdir(workdir, step)
  result = predictor.predict_files(paths)
  record = write_predictions(predictor, result, out_dir)
  print_summary(record, out_dir)
  return record
