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

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dmad_jax.data import base as data_base
from dmad_jax.data import images as images_lib
from dmad_jax.evaluation import calibration as cal_lib
from dmad_jax.evaluation.inference import Runner
from dmad_jax.models import get_detector
from dmad_jax.train import checkpoint, sharding
from dmad_jax.train import state as state_lib

log = logging.getLogger("dmad_jax")

PREDICTIONS_JSON = "predictions.json"
PREDICTIONS_CSV = "predictions.csv"


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


class Predictor:
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

    def predict(variables, batch):
      out = detector.predict(variables, batch)
      return {"scores": out.scores, "maps": out.maps}  # Pictures are not needed.

    self._runner = Runner(predict, mesh=mesh, variables_sharding=var_sh, batch_size=self.batch_size)

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

  @property
  def threshold(self) -> float | None:
    """The stored decision threshold (``score > threshold`` is anomalous), or None."""
    return None if self.calibration is None else float(self.calibration["threshold"])

  # -- preprocessing -------------------------------------------------------------------------
  def prepare(self, images) -> np.ndarray:
    """Model inputs ``(N, S, S, C)`` float32 in [-1, 1] from decoded images (see module doc).

    Raises:
      ValueError: for an unsupported shape or dtype, or float pixels outside [0, 1].
    """
    if isinstance(images, np.ndarray):
      # (H, W, C) would otherwise pass as H gray images of width W.
      if images.ndim not in (3, 4) or (images.ndim == 3 and images.shape[-1] in (1, 3, 4)):
        raise ValueError(
          f"images must be (N, H, W) or (N, H, W, C), got shape {images.shape}; put a single "
          "image in a list or add a leading axis"
        )
      items = list(images)
    else:
      items = [np.asarray(im) for im in images]
    size, ch = self.preprocessing["image_size"], self.preprocessing["channels"]
    out = []
    for i, im in enumerate(items):
      im = np.asarray(im)
      if np.issubdtype(im.dtype, np.floating):
        if not np.all(np.isfinite(im)) or im.min() < 0.0 or im.max() > 1.0:
          raise ValueError(
            f"image {i}: float pixels must be finite and in [0, 1], got range "
            f"[{np.nanmin(im):.4g}, {np.nanmax(im):.4g}] (pass uint8 for 0..255 values)"
          )
        im = np.rint(im * 255.0).astype(np.uint8)
      elif im.dtype != np.uint8:
        raise ValueError(f"image {i}: pixels must be uint8 or float in [0, 1], got {im.dtype}")
      try:
        prepared = images_lib.prepare_array(im, image_size=size, channels=ch)
      except ValueError as err:
        raise ValueError(f"image {i}: {err}") from err
      out.append(images_lib.to_unit_range(prepared))
    if not out:
      raise ValueError("no images given")
    return np.stack(out)

  def load(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Model inputs of image files, decoded as the folder source decodes them.

    Raises:
      ImageReadError: naming the first unreadable file (and how many others failed).
    """
    size, ch = self.preprocessing["image_size"], self.preprocessing["channels"]
    out, bad = [], []
    for path in paths:
      try:
        out.append(images_lib.load_image(path, image_size=size, channels=ch))
      except images_lib.ImageReadError as err:
        bad.append(err)
    if bad:
      more = f" ({len(bad) - 1} more unreadable: {', '.join(e.path for e in bad[1:])})"
      raise images_lib.ImageReadError(bad[0].path, bad[0].reason + (more if len(bad) > 1 else ""))
    if not out:
      raise ValueError("no image files given")
    return images_lib.to_unit_range(np.stack(out))

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

  def _result(self, inputs: np.ndarray) -> dict:
    raw = self.predict_inputs(inputs)
    if self.pixel_key not in raw["maps"]:
      raise ValueError(
        f"detector pixel map {self.pixel_key!r} not among its maps {sorted(raw['maps'])}"
      )
    score, amap = raw["scores"]["score"], raw["maps"][self.pixel_key]
    cal = self.calibration
    return {
      "score": score,
      "scores": raw["scores"],
      "normalized_score": None if cal is None else cal_lib.normalize_scores(score, cal),
      "is_anomalous": None if cal is None else score > cal["threshold"],
      "threshold": self.threshold,
      "map": amap,
      "normalized_map": None if cal is None else cal_lib.normalize_maps(amap, cal),
      "maps": raw["maps"],
      "inputs": inputs,
    }

  def __call__(self, images) -> dict:
    """Scores, labels and maps of decoded images (arrays; see the module docstring).

    Returns:
      ``score`` (N,) main image score; ``scores`` every image score of the detector;
      ``normalized_score`` (N,) in [0, 1] with the threshold at 0.5; ``is_anomalous`` (N,)
      bool (``score > threshold``); ``threshold``; ``map`` (N, S, S) the pixel map;
      ``normalized_map`` it scaled by the calibration's normal-map range to [0, 1]; ``maps``
      every map; ``inputs`` the model inputs. The calibrated entries are None without a
      calibration.
    """
    return self._result(self.prepare(images))

  def predict_files(self, paths: Sequence[str | os.PathLike]) -> dict:
    """As :meth:`__call__`, for image files (plus ``paths``).

    Raises:
      ImageReadError: naming the unreadable files, before the model runs.
    """
    paths = [os.fspath(p) for p in paths]
    result = self._result(self.load(paths))
    result["paths"] = paths
    return result


# ---------------------------------------------------------------------------------------------
# `dmad predict`: files in, heatmaps and a table out.
# ---------------------------------------------------------------------------------------------
def expand_paths(paths: Sequence[str]) -> list[str]:
  """Image files of ``paths``: files as given, folders as their image files (sorted).

  Raises:
    FileNotFoundError: for a path that does not exist, or a folder without image files.
  """
  out = []
  for p in paths:
    if os.path.isdir(p):
      found = sorted(
        os.path.join(p, n)
        for n in os.listdir(p)
        if os.path.splitext(n)[1].lower() in images_lib.IMAGE_EXTENSIONS and not n.startswith(".")
      )
      if not found:
        raise FileNotFoundError(f"folder {p!r} has no image files ({images_lib.IMAGE_EXTENSIONS})")
      out.extend(found)
    elif os.path.exists(p):
      out.append(p)
    else:
      raise FileNotFoundError(f"image {p!r} does not exist")
  return out


def _heatmap_names(paths: Sequence[str]) -> list[str]:
  """``<stem>_heatmap.png`` per path, numbered where two inputs share a stem."""
  names, seen = [], {}
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0]
    k = seen.get(stem, 0)
    seen[stem] = k + 1
    names.append(f"{stem}_heatmap.png" if k == 0 else f"{stem}_{k}_heatmap.png")
  return names


def write_predictions(predictor: Predictor, result: Mapping, out_dir: str) -> dict:
  """Writes one heatmap PNG per image and ``predictions.json`` / ``predictions.csv``.

  Returns:
    The JSON record (``step``, ``calibration`` summary, ``images`` with path, heatmap, scores
    and labels).
  """
  from dmad_jax.evaluation import figures

  os.makedirs(out_dir, exist_ok=True)
  cal = predictor.calibration or {}
  vmin, vmax = cal.get("map_min"), cal.get("map_max")
  rows = []
  names = _heatmap_names(result["paths"])
  for i, (path, name) in enumerate(zip(result["paths"], names, strict=True)):
    score = float(result["score"][i])
    row = {"path": os.path.abspath(path), "score": score}
    title = f"{os.path.basename(path)}\nscore {score:.4g}"
    if result["is_anomalous"] is not None:
      anomalous = bool(result["is_anomalous"][i])
      norm = float(result["normalized_score"][i])
      row.update(normalized_score=norm, is_anomalous=anomalous)
      title += (
        f" {'>' if anomalous else '<='} threshold {predictor.threshold:.4g} "
        f"(normalized {norm:.2f}): {'ANOMALOUS' if anomalous else 'normal'}"
      )
    row["scores"] = {k: float(v[i]) for k, v in sorted(result["scores"].items())}
    row["heatmap"] = figures.prediction_overlay(
      os.path.join(out_dir, name),
      result["inputs"][i],
      result["map"][i],
      vmin=vmin,
      vmax=vmax,
      title=title,
    )
    rows.append(row)
  record = {
    "workdir": predictor.workdir,
    "step": predictor.step,
    "pixel_map": predictor.pixel_key,
    "calibration": None
    if not cal
    else {
      k: cal[k]
      for k in ("method", "split", "quantile", "optimistic", "num_images", "threshold")
      if k in cal
    },
    "images": rows,
  }
  with open(os.path.join(out_dir, PREDICTIONS_JSON), "w") as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(out_dir, PREDICTIONS_CSV), "w", newline="") as f:
    fields = ["path", "score", "normalized_score", "is_anomalous", "heatmap"]
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return record


def predict_command(workdir: str, paths: Sequence[str], out_dir: str, step: int | None) -> dict:
  """``dmad predict``: restores the step, predicts the files, writes the outputs, prints a
  summary. Errors (unreadable image, no checkpoint, no calibration) raise before any output."""
  paths = expand_paths(paths)
  predictor = Predictor.from_workdir(workdir, step)
  result = predictor.predict_files(paths)
  record = write_predictions(predictor, result, out_dir)
  cal = record["calibration"]
  n_bad = sum(r["is_anomalous"] for r in record["images"])
  for r in record["images"]:
    label = "ANOMALOUS" if r["is_anomalous"] else "normal"
    norm = r["normalized_score"]
    print(f"{label:9s}  score {r['score']:.6g}  normalized {norm:.3f}  {r['path']}")
  print(
    f"{n_bad} of {len(paths)} images anomalous: score > threshold {cal['threshold']:.6g} "
    f"({cal['method']} on the {cal['split']} split, step {record['step']})"
  )
  print(f"heatmaps and {PREDICTIONS_JSON} / {PREDICTIONS_CSV}: {os.path.abspath(out_dir)}")
  return record
