"""What every image predictor shares, without model code: preprocessing, the calibrated result,
and ``dmad predict``'s outputs (heatmaps, ``predictions.json`` / ``.csv``, the printed summary).

:class:`dmad_jax.predict.Predictor` (a restored checkpoint) and
:class:`dmad_jax.exported.ExportedPredictor` (a ``dmad export`` file, run without Flax or the
model code) are both :class:`ImagePredictor` s; they differ only in how :meth:`predict_inputs`
computes the detector's scores and maps.
"""

from __future__ import annotations

import abc
import csv
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dmad_jax.data import images as images_lib
from dmad_jax.evaluation.normalize import normalize_maps, normalize_scores

PREDICTIONS_JSON = "predictions.json"
PREDICTIONS_CSV = "predictions.csv"


class ImagePredictor(abc.ABC):
  """Scores, decisions and maps of images, given :meth:`predict_inputs`.

  Subclasses set ``preprocessing`` (``{"image_size", "channels", ...}``), ``calibration`` (the
  stored record or None), ``pixel_key`` and ``step``, and implement :meth:`predict_inputs` and
  :meth:`source`.
  """

  preprocessing: dict
  calibration: dict | None
  pixel_key: str
  step: int

  @abc.abstractmethod
  def predict_inputs(self, inputs: np.ndarray) -> dict:
    """``{"scores": {name: (N,)}, "maps": {name: (N, S, S)}}`` for model inputs in [-1, 1]."""

  @abc.abstractmethod
  def source(self) -> dict:
    """Where the model comes from, for ``predictions.json`` (e.g. ``{"workdir": ...}``)."""

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
      "normalized_score": None if cal is None else normalize_scores(score, cal),
      "is_anomalous": None if cal is None else score > cal["threshold"],
      "threshold": self.threshold,
      "map": amap,
      "normalized_map": None if cal is None else normalize_maps(amap, cal),
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


def write_predictions(predictor: ImagePredictor, result: Mapping, out_dir: str) -> dict:
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
    **predictor.source(),
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


def print_summary(record: Mapping, out_dir: str) -> None:
  """Prints one line per image and the decision rule of ``write_predictions``'s record."""
  cal = record["calibration"]
  n_bad = sum(r["is_anomalous"] for r in record["images"])
  for r in record["images"]:
    label = "ANOMALOUS" if r["is_anomalous"] else "normal"
    norm = r["normalized_score"]
    print(f"{label:9s}  score {r['score']:.6g}  normalized {norm:.3f}  {r['path']}")
  print(
    f"{n_bad} of {len(record['images'])} images anomalous: score > threshold "
    f"{cal['threshold']:.6g} ({cal['method']} on the {cal['split']} split, step {record['step']})"
  )
  print(f"heatmaps and {PREDICTIONS_JSON} / {PREDICTIONS_CSV}: {os.path.abspath(out_dir)}")
