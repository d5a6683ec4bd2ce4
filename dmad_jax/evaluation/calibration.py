"""Decision threshold and score normalisation of a checkpoint, stored in its step directory.

A detector's image score ranks images; turning it into "anomalous or not" needs a threshold, and
showing scores and maps to a user needs a fixed scale. Both are fitted here on a *named* split,
once per checkpoint step, and stored next to the weights as
``<workdir>/checkpoints/<step>/calibration.json`` (written to a temporary file and renamed, so a
reader never sees half a file). A restored step therefore finds its own calibration, orbax's
``max_to_keep`` deletes it with its step, and checkpoints without the file still restore (it is
not an orbax item; ``dmad predict`` then says how to create it).

Methods (``config.calibration``; the section is optional, defaults in :data:`DEFAULTS`):

* ``normal_quantile`` (default): the threshold is the ``quantile`` (default 0.99, linear
  interpolation as ``np.quantile``) of the image scores of the split's *normal* images; no labels
  of anomalies are needed. About ``1 - quantile`` of unseen normal images score above it.
* ``lognormal``: the one-sided ``quantile`` *prediction bound* of a normal distribution fitted
  to the logarithms of the normal images' scores, ``exp(mean + t * std * sqrt(1 + 1/n))`` with
  ``t`` Student's t quantile at ``n - 1`` degrees of freedom (``std`` with ``ddof=1``). When
  log-scores are normal, an unseen normal image scores above it with probability exactly
  ``1 - quantile``, whatever ``n``; the empirical quantile of few images is near their maximum,
  which unseen normals exceed with probability about ``1 / (n + 1)`` (9% for 10 held-out
  images, however small ``1 - quantile`` is). Needs positive scores and at least 2 normal
  images (with 2, t has 1 degree of freedom and the bound is far above them).
* ``f1``: the threshold that maximises the F1 score (anomalous = positive) on a *labelled* split;
  candidates lie half-way between consecutive distinct scores, so a score that moves by rounding
  does not change its label; ties go to the highest threshold.

An image is anomalous when ``score > threshold``. Splits (``calibration.split``):

* ``validation`` (default): images the model never trained on. For a folder source,
  ``<root>/validation/good/*`` (and, for ``f1``, ``<root>/validation/<defect>/*``) when the
  folder exists, otherwise the share ``config.data.validation_fraction`` of ``train/good`` held
  out of training; for digits, the labelled share of the train part set aside by
  ``config.data.validation_fraction``. Read with the data config's size and channels.
* ``train`` (a named option, every data source): the training images. They are normal, but the
  model has fitted them, so their scores are lower than those of new normal images and the
  threshold flags more new normal images than ``1 - quantile`` (a 50-image folder trained to the
  end flagged most of its normal test images this way).
* ``test``: allowed, but the threshold is then fitted on the images it is evaluated on: the run
  logs a warning and the stored metadata says ``"optimistic": true``.

Stored (JSON): the method, split, quantile, number of images, step, model name, the name of the
image score and of the pixel map, the threshold, the split's score statistics (min, max, mean,
std) and the pixel-map range of its normal images (the heatmap colour scale), and the
preprocessing of the data source (image size, channels, value range, resize filter), which
:mod:`dmad_jax.predict` applies to new images. Normalised scores are
``clip((score - threshold) / (max - min) + 0.5, 0, 1)``: the threshold maps to 0.5 and the
split's score range to a width of 1 (anomalib's min-max normalisation around the threshold).

Who fits it: ``dmad calibrate --workdir W [--config C] [--step N]`` (:func:`calibrate`, always
refits; without ``--config`` it reads the run's ``config.json``), and the eval job
(:func:`for_eval`), which fits and stores it when the config has a ``calibration`` section and
the step has no calibration made with the same settings, and then reports the threshold's
precision, recall and F1 on the test labels (for information, never used to fit). A threshold
is separate from a detector's own ``calibrate`` hook (statistics of the training split kept
*inside* the state, e.g. DAAD+'s score scaling, refreshed at every checkpoint): that one changes
the scores, this one reads them after the fact, may need a labelled split, and adding it to the
state would break restoring older checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import jax
import numpy as np

from dmad_jax import data as data_lib
from dmad_jax.configs import schema
from dmad_jax.evaluation.inference import Runner
from dmad_jax.train import checkpoint, sharding
from dmad_jax.train import state as state_lib

log = logging.getLogger("dmad_jax")

CALIBRATION_FILE = "calibration.json"
METHODS = ("normal_quantile", "lognormal", "f1")
# The methods that fit normal images only; ``quantile`` is one of their settings.
QUANTILE_METHODS = ("normal_quantile", "lognormal")
SPLITS = ("train", "validation", "test")
DEFAULTS = {"method": "normal_quantile", "split": "validation", "quantile": 0.99}
# Settings whose change makes a stored calibration stale.
_SETTING_KEYS = tuple(DEFAULTS)
# Image sources all decode to uint8, resize with PIL's bilinear filter, then scale to [-1, 1]
# (dmad_jax.data.images); the record names that pipeline.
RESIZE = "PIL bilinear"
VALUE_RANGE = (-1.0, 1.0)


class CalibrationMissingError(FileNotFoundError):
  """A checkpoint step has no stored calibration (``calibration.json``)."""


# ---------------------------------------------------------------------------------------------
# Settings and the calibration split.
# ---------------------------------------------------------------------------------------------
def settings(config) -> dict:
  """``config.calibration`` merged into :data:`DEFAULTS` and checked.

  Raises:
    ValueError: for an unknown key, method or split, or a quantile outside (0, 1).
  """
  out = schema.section(config, "calibration", DEFAULTS)
  if out["method"] not in METHODS:
    raise ValueError(f"config.calibration.method must be one of {METHODS}, got {out['method']!r}")
  if out["split"] not in SPLITS:
    raise ValueError(f"config.calibration.split must be one of {SPLITS}, got {out['split']!r}")
  q = out["quantile"]
  if isinstance(q, bool) or not isinstance(q, int | float) or not 0.0 < float(q) < 1.0:
    raise ValueError(f"config.calibration.quantile must be a number in (0, 1), got {q!r}")
  out["quantile"] = float(q)
  return out


def split_source(config, split: str):
  """The source of calibration split ``split`` (see the module docstring).

  Raises:
    ValueError: for ``validation`` with a data source that is not a folder.
    FileNotFoundError: when the folder has no ``validation/`` split (the message shows the
      layout and the alternatives).
  """
  if split == "validation":
    data = config.data
    held_out = float(data.get("validation_fraction", 0.0) or 0.0) > 0
    if data.name not in ("folder", "digits") or (data.name == "digits" and not held_out):
      raise ValueError(
        f"calibration split 'validation' needs images held out of training: a folder dataset "
        f"(<root>/validation/good/... or config.data.validation_fraction > 0) or digits with "
        f"config.data.validation_fraction > 0; data source {data.name!r} has none: set one, or "
        "use --config.calibration.split=train"
      )
    folder = os.path.join(data.root, "validation") if data.name == "folder" else None
    if folder is not None and not held_out and not os.path.isdir(folder):
      raise FileNotFoundError(
        f"calibration split 'validation': {folder!r} does not exist. Put normal images the "
        f"model did not train on in {os.path.join(folder, 'good')}/ (and, for method 'f1', "
        f"anomalous ones in {os.path.join(folder, '<defect>')}/), or hold out a share of the "
        "training images with --config.data.validation_fraction=0.2, or use "
        "--config.calibration.split=train"
      )
  return data_lib.get_source(config.data, split)


def preprocessing(config) -> dict:
  """How the data source turns a decoded image into a model input (stored for predict)."""
  data = config.data
  return {
    "source": str(data.name),
    "image_size": int(data.image_size),
    "channels": int(data.get("channels", 1 if data.name == "digits" else 3)),
    "value_range": list(VALUE_RANGE),
    "resize": RESIZE,
  }


# ---------------------------------------------------------------------------------------------
# Fitting (pure NumPy).
# ---------------------------------------------------------------------------------------------
def f1_threshold(scores, labels) -> tuple[float, dict]:
  """The threshold maximising F1 of ``score > threshold`` against ``labels`` (1 = anomalous).

  Returns:
    (threshold, {"precision", "recall", "F1"} at it).

  Raises:
    ValueError: when the labels lack either class.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  pos, neg = np.sort(scores[labels == 1]), np.sort(scores[labels == 0])
  if not pos.size or not neg.size:
    raise ValueError(
      f"method 'f1' needs normal and anomalous images, got {neg.size} normal and {pos.size} "
      "anomalous; use method 'normal_quantile' or a labelled split"
    )
  levels = np.unique(scores)
  # Cut k flags every score >= levels[k]: half-way below levels[k] (below the minimum for k=0).
  gaps = np.diff(levels)
  below = levels[0] - (gaps[0] / 2 if gaps.size else 0.5)
  cuts = np.concatenate([[below], levels[:-1] + gaps / 2])
  tp = pos.size - np.searchsorted(pos, levels, side="left")
  fp = neg.size - np.searchsorted(neg, levels, side="left")
  f1 = 2 * tp / (tp + fp + pos.size)
  k = int(np.flatnonzero(f1 == f1.max())[-1])  # The highest threshold among ties.
  return float(cuts[k]), {
    "precision": float(tp[k] / (tp[k] + fp[k])),
    "recall": float(tp[k] / pos.size),
    "F1": float(f1[k]),
  }


def threshold_report(scores, labels, threshold: float, prefix: str = "threshold_") -> dict:
  """Precision, recall, F1 and false-positive rate of ``score > threshold`` (1 = anomalous).

  Undefined ratios (no predicted or no actual anomalies) are reported as 0.
  """
  scores, labels = np.asarray(scores), np.asarray(labels)
  pred = scores > threshold
  tp = int(np.sum(pred & (labels == 1)))
  fp = int(np.sum(pred & (labels == 0)))
  n_pos, n_neg = int(np.sum(labels == 1)), int(np.sum(labels == 0))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / n_pos if n_pos else 0.0
  f1 = 2 * tp / (tp + fp + n_pos) if tp + fp + n_pos else 0.0
  return {
    f"{prefix}precision": precision,
    f"{prefix}recall": recall,
    f"{prefix}F1": f1,
    f"{prefix}FPR": fp / n_neg if n_neg else 0.0,
  }


def lognormal_threshold(normal_scores, quantile: float) -> float:
  """The ``lognormal`` threshold (see the module docstring) of the normal images' scores."""
  from scipy import stats

  normal = np.asarray(normal_scores, np.float64).reshape(-1)
  if normal.size < 2:
    raise ValueError(
      f"method 'lognormal' needs at least 2 normal images to fit, the split has {normal.size}"
    )
  if np.any(normal <= 0):
    raise ValueError(
      f"method 'lognormal' needs positive scores; {int(np.sum(normal <= 0))} of the split's "
      f"normal images score <= 0 (use method 'normal_quantile')"
    )
  logs = np.log(normal)
  n = logs.size
  bound = stats.t.ppf(quantile, n - 1) * logs.std(ddof=1) * np.sqrt(1.0 + 1.0 / n)
  return float(np.exp(logs.mean() + bound))


def fit(scores, labels, *, method: str, quantile: float = DEFAULTS["quantile"]) -> dict:
  """Threshold and score statistics of a split's image scores.

  Args:
    scores: ``(N,)`` image scores (higher = more anomalous).
    labels: ``(N,)`` labels, 1 = anomalous (all 0 for a normal-only split).
    method: ``"normal_quantile"``, ``"lognormal"`` or ``"f1"``.
    quantile: for ``normal_quantile`` and ``lognormal``.

  Returns:
    ``{"threshold", "score_min", "score_max", "score_mean", "score_std"}`` plus, for ``f1``,
    the split's ``"split_precision"``, ``"split_recall"``, ``"split_F1"`` at the threshold.

  Raises:
    ValueError: for non-finite scores, a split without normal images (``normal_quantile``),
      with fewer than 2 or non-positive ones (``lognormal``), without both classes (``f1``),
      or an unknown method.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{int(np.sum(~np.isfinite(scores)))} non-finite scores: cannot calibrate")
  out = {}
  if method == "normal_quantile":
    normal = scores[labels == 0]
    if not normal.size:
      raise ValueError("method 'normal_quantile' needs normal images; the split has none")
    out["threshold"] = float(np.quantile(normal, quantile))
  elif method == "lognormal":
    out["threshold"] = lognormal_threshold(scores[labels == 0], quantile)
  elif method == "f1":
    out["threshold"], at = f1_threshold(scores, labels)
    out.update({f"split_{k}": v for k, v in at.items()})
  else:
    raise ValueError(f"unknown calibration method {method!r}; known: {METHODS}")
  out.update(
    score_min=float(scores.min()),
    score_max=float(scores.max()),
    score_mean=float(scores.mean()),
    score_std=float(scores.std()),
  )
  return out


# ---------------------------------------------------------------------------------------------
# Scoring a split, storing and loading.
# ---------------------------------------------------------------------------------------------
def collect_scores(runner, variables, source, *, pixel_key: str | None):
  """Image scores of every record of ``source`` once, plus the range of the normal pixel maps.

  Args:
    runner: an inference runner of the detector's ``predict`` (keeping ``label``).
    variables: the model variables, sharded for ``runner``.
    source: random-access source of records.
    pixel_key: the detector's pixel map (None: no map range).

  Returns:
    ``{"score": (N,), "label": (N,), "map_min": float, "map_max": float}`` (map range over the
    normal records, or over all when there are none; NaN without a pixel map).
  """
  scores, labels = [], []
  lo, hi = {0: np.inf, 1: np.inf}, {0: -np.inf, 1: -np.inf}
  for pred, kept in runner.over(variables, source):
    scores.append(np.asarray(pred.scores["score"]))
    labels.append(np.asarray(kept["label"]))
    if pixel_key is None:
      continue
    if pixel_key not in pred.maps:
      raise ValueError(f"detector pixel map {pixel_key!r} not among its maps {sorted(pred.maps)}")
    maps = np.asarray(pred.maps[pixel_key], np.float32)
    for cls in (0, 1):
      sel = maps[labels[-1] == cls]
      sel = sel[np.isfinite(sel)]
      if sel.size:
        lo[cls], hi[cls] = min(lo[cls], float(sel.min())), max(hi[cls], float(sel.max()))
  labels = np.concatenate(labels)
  cls = 0 if np.any(labels == 0) else 1
  no_map = pixel_key is None
  return {
    "score": np.concatenate(scores),
    "label": labels,
    "map_min": float("nan") if no_map else lo[cls],
    "map_max": float("nan") if no_map else hi[cls],
  }


def calibration_path(workdir: str, step: int) -> str:
  """``<workdir>/checkpoints/<step>/calibration.json``."""
  return os.path.join(checkpoint.checkpoint_dir(workdir), str(int(step)), CALIBRATION_FILE)


def save(workdir: str, step: int, calibration: Mapping) -> str:
  """Writes the calibration of ``step`` atomically (temporary file, then rename).

  Raises:
    FileNotFoundError: when the step directory does not exist.
  """
  path = calibration_path(workdir, step)
  if not os.path.isdir(os.path.dirname(path)):
    raise FileNotFoundError(f"no checkpoint directory {os.path.dirname(path)!r} for step {step}")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(dict(calibration), f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def load(workdir: str, step: int) -> dict | None:
  """The stored calibration of ``step``, or None when there is none."""
  path = calibration_path(workdir, step)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def fit_split(config, step: int, collected: Mapping, *, pixel_key: str) -> dict:
  """The calibration record of ``step`` from :func:`collect_scores` of the configured split."""
  s = settings(config)
  labels = np.asarray(collected["label"])
  record = {
    "method": s["method"],
    "split": s["split"],
    "quantile": s["quantile"] if s["method"] in QUANTILE_METHODS else None,
    "optimistic": s["split"] == "test",
    "step": int(step),
    "model_name": str(config.model_name),
    "score": "score",
    "score_settings": score_settings(config),
    "pixel_map": pixel_key,
    "num_images": int(labels.size),
    "num_normal": int(np.sum(labels == 0)),
    "num_anomalous": int(np.sum(labels == 1)),
  }
  record.update(fit(collected["score"], labels, method=s["method"], quantile=s["quantile"]))
  record.update(
    map_min=float(collected["map_min"]),
    map_max=float(collected["map_max"]),
    preprocessing=preprocessing(config),
  )
  return record


def _warn_if_test(split: str) -> None:
  if split == "test":
    log.warning(
      "calibrating on the test split: the threshold is fitted on the images it is evaluated on, "
      "so threshold metrics on the test split are optimistic (stored as optimistic=true)"
    )


def score_settings(config) -> dict | None:
  """The config's ``score`` section as JSON has it (None without one): a threshold fitted on one
  score does not hold for another (another stage, distance or number of prototypes)."""
  section = config.get("score", None)
  return None if section is None else json.loads(section.to_json())


def is_current(stored: Mapping | None, config) -> bool:
  """Whether ``stored`` was made with the config's calibration and score settings."""
  if not stored:
    return False
  want = settings(config)
  if want["method"] not in QUANTILE_METHODS:
    want = {**want, "quantile": None}
  same_score = stored.get("score_settings") == score_settings(config)
  return same_score and all(stored.get(k) == want[k] for k in _SETTING_KEYS)


def calibrate_step(config, workdir: str, step: int, *, runner, variables, pixel_key) -> dict:
  """Scores the configured split with a restored model, fits and stores the calibration.

  Arguments as :func:`collect_scores`. Only process 0 writes.

  Returns:
    The stored record.
  """
  s = settings(config)
  _warn_if_test(s["split"])
  source = split_source(config, s["split"])
  collected = collect_scores(runner, variables, source, pixel_key=pixel_key)
  record = fit_split(config, step, collected, pixel_key=pixel_key)
  if jax.process_index() == 0:
    path = save(workdir, step, record)
    log.info(
      "calibration of step %d (%s on %s, %d images): threshold %.6g -> %s",
      step,
      s["method"],
      s["split"],
      record["num_images"],
      record["threshold"],
      path,
    )
  return record


def for_eval(config, workdir: str, step: int, test_scores, test_labels, **model) -> dict:
  """The eval job's part: the step's calibration (fitted and stored first when the config has
  a ``calibration`` section and the stored one is missing or made with other settings) and its
  threshold's precision / recall / F1 / FPR on the test labels, for information.

  Args:
    config: the training config.
    workdir: the run directory.
    step: the evaluated step.
    test_scores: the test split's image scores.
    test_labels: the test split's labels.
    **model: the keyword arguments of :func:`calibrate_step` (runner, variables, pixel_key).

  Returns:
    ``{}`` when there is no calibration to report (no section and none stored, or fitting
    failed: logged as a warning, the evaluation itself goes on); otherwise ``threshold``,
    ``threshold_method``, ``threshold_split``, ``threshold_num_normal`` (the normal images it
    was fitted on), ``threshold_nominal_FPR`` (``1 - quantile``, for ``normal_quantile`` and
    ``lognormal``) and the ``threshold_*`` metrics on the test split (``threshold_FPR``: the
    share of its normal images flagged).
  """
  stored = load(workdir, step)
  if config.get("calibration", None) is not None and not is_current(stored, config):
    try:
      stored = calibrate_step(config, workdir, step, **model)
    except (ValueError, FileNotFoundError) as err:
      log.warning("calibration of step %d not stored: %s", step, err)
  if not stored:
    return {}
  out = {
    "threshold": float(stored["threshold"]),
    "threshold_method": stored["method"],
    "threshold_split": stored["split"],
    "threshold_num_normal": int(stored.get("num_normal", 0)),
  }
  if stored["method"] in QUANTILE_METHODS:
    # About this share of unseen normal images should score above a quantile threshold; the
    # test normals' threshold_FPR says whether they do.
    out["threshold_nominal_FPR"] = 1.0 - float(stored["quantile"])
  out.update(threshold_report(test_scores, test_labels, stored["threshold"]))
  return out


# ---------------------------------------------------------------------------------------------
# `dmad calibrate`.
# ---------------------------------------------------------------------------------------------
def calibrate(config, workdir: str, step: int | None = None) -> dict:
  """``dmad calibrate``: fits and stores the calibration of ``step`` (default: the latest).

  Reads only the calibration split (not the test split). Always refits.

  Returns:
    The stored record (see the module docstring).

  Raises:
    FileNotFoundError: when ``workdir`` has no checkpoint (or not ``step``), or the split's
      folder is missing.
    ValueError: for invalid settings or a split that cannot be calibrated on.
  """
  from dmad_jax.models import get_detector

  workdir = os.path.abspath(workdir)
  step = checkpoint.latest_step(workdir, step)
  s = settings(config)
  source = split_source(config, s["split"])
  detector = get_detector(config)
  mesh = sharding.make_mesh(config.get("mesh", None))
  variables, var_sh = state_lib.restore_variables(
    config, detector, source.element_spec, workdir, step, mesh
  )
  runner = Runner(
    detector.predict,
    mesh=mesh,
    variables_sharding=var_sh,
    batch_size=int(config.get("eval", {}).get("batch_size", 64)),
  )
  return calibrate_step(
    config, workdir, step, runner=runner, variables=variables, pixel_key=detector.pixel_map
  )
