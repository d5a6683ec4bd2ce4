"""Image- and pixel-level anomaly-detection metrics (NumPy, SciPy + scikit-learn, no JAX).

Conventions used throughout: ``labels`` are 0 (normal) / 1 (anomalous) and ``scores`` are "higher
means more anomalous", so an AUROC of 1 means every anomalous image outscores every normal one.
Pixel metrics take ``anomaly_maps`` and binary ground-truth ``masks`` of shape ``(N, H, W)``:

* `pixel_auroc`: ROC AUC over all pixels of all images pooled (anomalib's ``pixel_AUROC``).
* `aupro`: the pooled MVTec AD / anomalib per-region-overlap curve up to a false-positive rate of
  0.3, normalised to [0, 1] (report it as ``pixel_AUPRO``).
* `aupro_rd4ad`: the per-image variant the RD4AD (and DMAD-PPDM) code computes; it gives different
  numbers and must be reported under its own name (``pixel_AUPRO_rd4ad``).
* `pixel_auroc_per_image`: the pixel AUROC of each anomalous image, averaged (the CAVGA protocol
  the IGD code reports; ``pixel_AUROC_per_image``, next to the pooled one).

The checks are strict on purpose: scikit-learn either raises a terse error (one class present) or
silently propagates NaN scores into a meaningless AUROC, and a diverged model that emits NaN is
exactly the case an evaluation must report rather than hide.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score

__all__ = [
  "aupro",
  "aupro_rd4ad",
  "auroc_report",
  "image_auroc",
  "pixel_auroc",
  "pixel_auroc_per_image",
  "region_labels",
]


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


# --------------------------------------------------------------------------------------------
# Pixel-level metrics.

# Pixels processed per step of the cumulative sums in `pro_curve`; bounds the temporary memory to
# a few tens of MB whatever the size of the test set.
_PRO_CHUNK = 1 << 20


def _validate_pixels(anomaly_maps, masks, *, need_normal: bool = True):
  """Checks pixel-metric inputs and returns them as arrays.

  Args:
    anomaly_maps: Array-like ``(N, H, W)`` of per-pixel scores, higher = more anomalous.
    masks: Array-like ``(N, H, W)`` ground truth, bool or 0/1 (any numeric dtype).
    need_normal: Also require at least one normal (0) pixel.

  Returns:
    ``(maps, masks)``: the maps as a floating array (integer maps become float64; float16/32 are
    kept, so no copy is made) and the masks as bool.

  Raises:
    ValueError: For a wrong rank, a shape mismatch, non-binary masks, non-finite scores, or no
      anomalous (or, with ``need_normal``, no normal) pixel.
  """
  maps = np.asarray(anomaly_maps)
  masks = np.asarray(masks)
  if maps.ndim != 3:
    raise ValueError(f"anomaly_maps must have shape (N, H, W), got shape {maps.shape}")
  if masks.shape != maps.shape:
    raise ValueError(
      f"masks must have the shape of anomaly_maps {maps.shape}, got masks of shape {masks.shape}"
    )
  if not np.issubdtype(maps.dtype, np.floating):
    maps = maps.astype(np.float64)
  if masks.dtype != np.bool_:
    is_one = masks == 1
    binary = is_one | (masks == 0)
    if not binary.all():
      bad = masks[~binary]
      raise ValueError(
        f"masks must be binary (bool or 0/1); found {bad.size} other values, e.g. "
        f"{np.unique(bad)[:5].tolist()} (binarise soft masks first, e.g. mask > 0.5)"
      )
    masks = is_one
  non_finite = ~np.isfinite(maps)
  if non_finite.any():
    n_nan = int(np.isnan(maps).sum())
    raise ValueError(
      f"anomaly_maps contain {int(non_finite.sum())} non-finite values of {maps.size} "
      f"({n_nan} NaN, {int(non_finite.sum()) - n_nan} inf)"
    )
  n_anomalous = int(np.count_nonzero(masks))
  if n_anomalous == 0:
    raise ValueError(
      f"masks of {masks.shape[0]} images have no anomalous pixel; pixel metrics need at least one"
    )
  if need_normal and n_anomalous == masks.size:
    raise ValueError(
      f"masks of {masks.shape[0]} images have no normal pixel; pixel metrics need at least one"
    )
  return maps, masks


def pixel_auroc(anomaly_maps, masks) -> float:
  """Pixel-level ROC AUC over all pixels of all images pooled ("micro"), as anomalib reports it.

  Exact (no binning): every distinct score is a threshold and ties count 1/2.

  Args:
    anomaly_maps: Array-like ``(N, H, W)`` of per-pixel scores, higher = more anomalous.
    masks: Array-like ``(N, H, W)`` ground truth, bool or 0/1; 1 = anomalous pixel.

  Returns:
    The AUROC as a Python float in [0, 1].

  Raises:
    ValueError: For a shape mismatch, non-binary masks, NaN/inf scores, or when the masks hold
      no anomalous or no normal pixel.
  """
  maps, masks = _validate_pixels(anomaly_maps, masks)
  return float(roc_auc_score(masks.reshape(-1), maps.reshape(-1)))


def pixel_auroc_per_image(anomaly_maps, masks) -> float:
  """The mean over anomalous images of each image's own pixel ROC AUC (the per-image protocol
  of CAVGA that the IGD code reports); images whose mask is all normal or all anomalous have no
  AUROC of their own and are left out.

  Raises:
    ValueError: as :func:`pixel_auroc`, or when no image has both kinds of pixel.
  """
  maps, masks = _validate_pixels(anomaly_maps, masks)
  per_image = []
  for m, g in zip(maps, masks, strict=True):
    n = int(g.sum())
    if 0 < n < g.size:
      per_image.append(roc_auc_score(g.reshape(-1), m.reshape(-1)))
  if not per_image:
    raise ValueError("no image has both anomalous and normal pixels: no per-image pixel AUROC")
  return float(np.mean(per_image))


def region_labels(masks) -> tuple[np.ndarray, int]:
  """Connected ground-truth regions of a set of masks, numbered uniquely across the set.

  Regions are 8-connected within an image (as MVTec AD's reference code, ``scipy.ndimage.label``
  with a 3x3 structure, and OpenCV's default) and never span two images.

  Args:
    masks: ``(N, H, W)`` bool (or 0/1) masks.

  Returns:
    ``(labels, num_regions)``: int32 ``(N, H, W)`` with 0 on normal pixels and ``1..num_regions``
    on the regions, numbered image by image in raster order.
  """
  structure = np.zeros((3, 3, 3), dtype=bool)
  structure[1] = True  # Full 3x3 neighbourhood in-plane, no links between images.
  labels, num = ndimage.label(np.asarray(masks, dtype=bool), structure=structure)
  return labels.astype(np.int32, copy=False), int(num)


def pro_curve(anomaly_maps, masks, *, max_fpr: float | None = None):
  """The pooled per-region-overlap (PRO) curve of MVTec AD / anomalib, at every distinct score.

  For a threshold ``t`` a pixel is predicted anomalous when its score is ``>= t``. Over all
  images pooled:

  * ``FPR(t)`` = predicted-anomalous normal pixels / all normal pixels (one global rate, not per
    image);
  * ``PRO(t)`` = mean over every ground-truth region of every image of the fraction of that
    region predicted anomalous (each region weighs the same, whatever its size).

  Every distinct score value is a threshold (pixels with tied scores enter together, so a tie
  between normal and anomalous pixels is a diagonal segment) and the curve starts at (0, 0).
  Computed with one sort of all pixels and chunked cumulative sums, in O(P log P) time for P
  pixels; peak extra memory is about 35 bytes per pixel (measured 364 MiB and 3 s for 167 maps of
  256x256 on one CPU core).

  Args:
    anomaly_maps: Array-like ``(N, H, W)`` of per-pixel scores, higher = more anomalous.
    masks: Array-like ``(N, H, W)`` ground truth, bool or 0/1.
    max_fpr: If given, the curve stops at the first point whose FPR exceeds ``max_fpr`` (that
      point included), which is all `aupro` needs.

  Returns:
    ``(fpr, pro, thresholds)``: float64 arrays of equal length; ``fpr`` is non-decreasing from 0,
    ``thresholds`` decreasing with ``+inf`` for the (0, 0) start.

  Raises:
    ValueError: As `pixel_auroc`.
  """
  maps, masks = _validate_pixels(anomaly_maps, masks)
  labels, num_regions = region_labels(masks)
  labels = labels.reshape(-1)
  scores = maps.reshape(-1)
  n_normal = int(scores.size - np.count_nonzero(masks))
  # Each region pixel carries 1 / (area * num_regions), so a region fully found adds
  # 1 / num_regions to the PRO and the PRO reaches exactly 1 when every region is.
  areas = np.bincount(labels, minlength=num_regions + 1).astype(np.float64)
  weight = np.zeros(num_regions + 1)
  weight[1:] = 1.0 / (areas[1:] * num_regions)

  order = np.argsort(scores, kind="stable")[::-1]
  sorted_scores = scores[order]
  sorted_labels = labels[order]
  del order, labels
  # True at the last position of every run of tied scores: one curve point per distinct score.
  is_end = np.empty(scores.size, dtype=bool)
  np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=is_end[:-1])
  is_end[-1] = True

  fp_parts, pro_parts, thr_parts = [], [], []
  fp_total, pro_total = 0, 0.0
  for start in range(0, scores.size, _PRO_CHUNK):
    stop = min(start + _PRO_CHUNK, scores.size)
    chunk = sorted_labels[start:stop]
    fp = np.cumsum(chunk == 0, dtype=np.int64) + fp_total
    pro = np.cumsum(weight[chunk]) + pro_total
    fp_total, pro_total = int(fp[-1]), float(pro[-1])
    local = np.flatnonzero(is_end[start:stop])
    fp_parts.append(fp[local])
    pro_parts.append(pro[local])
    thr_parts.append(sorted_scores[start + local])
    if max_fpr is not None and local.size and fp_parts[-1][-1] / n_normal > max_fpr:
      break  # The curve already holds its first point beyond max_fpr.
  fp = np.concatenate(fp_parts)
  pro = np.concatenate(pro_parts)
  thresholds = np.concatenate(thr_parts).astype(np.float64)
  fpr = fp / float(n_normal)
  if max_fpr is not None:
    # Keep everything up to and including the first point beyond max_fpr.
    cut = int(np.searchsorted(fpr, max_fpr, side="right"))
    fpr, pro, thresholds = fpr[: cut + 1], pro[: cut + 1], thresholds[: cut + 1]
  return (
    np.concatenate([[0.0], fpr]),
    np.concatenate([[0.0], pro]),
    np.concatenate([[np.inf], thresholds]),
  )


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  """Trapezoid area under ``y(x)`` from ``x[0]`` to ``x_max`` (``x`` non-decreasing).

  When ``x_max`` falls between two points, ``y`` is linearly interpolated at ``x_max`` between the
  last point with ``x <= x_max`` and the first with ``x > x_max``.
  """
  i = int(np.searchsorted(x, x_max, side="right"))  # First index with x > x_max.
  if i < x.size:
    x0, y0, x1, y1 = x[i - 1], y[i - 1], x[i], y[i]
    y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    x = np.append(x[:i], x_max)
    y = np.append(y[:i], y_end)
  return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def aupro(anomaly_maps, masks, fpr_limit: float = 0.3) -> float:
  """Normalised area under the pooled PRO curve up to ``fpr_limit`` (MVTec AD / anomalib AUPRO).

  The curve is `pro_curve`: every distinct score is a threshold, the FPR is pooled over the
  normal pixels of all images and the PRO is averaged over all ground-truth regions of all
  images. It is integrated with the trapezoid rule from FPR 0 to exactly ``fpr_limit``, the PRO at
  ``fpr_limit`` being linearly interpolated between the two curve points around it, and divided
  by ``fpr_limit`` so a perfect detector scores 1.

  This is not what the RD4AD / DMAD-PPDM code computes; see `aupro_rd4ad`.

  Args:
    anomaly_maps: Array-like ``(N, H, W)`` of per-pixel scores, higher = more anomalous.
    masks: Array-like ``(N, H, W)`` ground truth, bool or 0/1; normal images have all-zero masks
      and contribute only false positives.
    fpr_limit: Upper FPR integration limit in ``(0, 1]``.

  Returns:
    The AUPRO as a Python float in [0, 1].

  Raises:
    ValueError: For ``fpr_limit`` outside ``(0, 1]`` and as `pixel_auroc`.
  """
  fpr_limit = float(fpr_limit)
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
  fpr, pro, _ = pro_curve(anomaly_maps, masks, max_fpr=fpr_limit)
  return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def aupro_rd4ad(anomaly_maps, masks, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
  """The AUPRO as the RD4AD code computes it (``compute_pro`` called per anomalous image).

  Reproduces RD4AD's ``test.py`` (DMAD-PPDM ships the same function): for every image whose mask
  has an anomalous pixel, separately,

  1. thresholds ``np.arange(min, max, (max - min) / num_thresholds)`` of that image's map
     (``num_thresholds`` equally spaced values, sometimes one more from float rounding); a pixel
     is predicted anomalous when its score is ``> t`` (strictly);
  2. PRO(t) = mean over the image's 8-connected regions of the fraction predicted anomalous;
     FPR(t) = predicted-anomalous normal pixels of *that image* / its normal pixels;
  3. only thresholds with FPR < ``fpr_limit`` are kept, their FPRs are divided by the largest kept
     FPR (not by ``fpr_limit``), and the area is `sklearn.metrics.auc` (trapezoid, no
     interpolation at the limit);

  and the per-image areas are averaged. Differences from `aupro` (the pooled MVTec definition):
  per-image FPRs and region averages instead of pooled ones, so every anomalous image weighs the
  same and normal images are ignored; 200 binned thresholds per image instead of every score; the
  x axis stretched to the largest kept FPR. The numbers differ (e.g. patchcore-inspection #26:
  92.9 vs 94.9); report this one only under its own name.

  Args:
    anomaly_maps: Array-like ``(N, H, W)`` of per-pixel scores, higher = more anomalous.
    masks: Array-like ``(N, H, W)`` ground truth, bool or 0/1.
    fpr_limit: Kept thresholds have FPR strictly below this value, in ``(0, 1]``.
    num_thresholds: Number of threshold steps per image.

  Returns:
    The mean of the per-image areas, a Python float in [0, 1].

  Raises:
    ValueError: As `pixel_auroc` (no normal pixel overall is allowed), for a bad ``fpr_limit`` or
      ``num_thresholds``, and for an anomalous image where the RD4AD curve is undefined (the
      original code crashes there too): a constant map, no normal pixel, fewer than two kept
      thresholds, or all kept FPRs zero. The message names the image index.
  """
  fpr_limit = float(fpr_limit)
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
  if int(num_thresholds) < 1:
    raise ValueError(f"num_thresholds must be a positive int, got {num_thresholds}")
  maps, masks = _validate_pixels(anomaly_maps, masks, need_normal=False)
  structure = np.ones((3, 3), dtype=bool)
  areas = []
  for i in np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)):
    amap = maps[i].astype(np.float64)
    lo, hi = float(amap.min()), float(amap.max())
    if hi <= lo:
      raise ValueError(
        f"aupro_rd4ad: image {i} has a constant anomaly map ({lo}); its threshold step is 0"
      )
    thresholds = np.arange(lo, hi, (hi - lo) / int(num_thresholds))
    n_th = thresholds.size
    # Number of thresholds strictly below each score: the pixel is positive at exactly those.
    below = np.searchsorted(thresholds, amap.reshape(-1), side="left")
    labels, n_regions = ndimage.label(masks[i], structure=structure)
    hist = np.bincount(
      labels.reshape(-1).astype(np.int64) * (n_th + 1) + below,
      minlength=(n_regions + 1) * (n_th + 1),
    ).reshape(n_regions + 1, n_th + 1)
    # positives[r, k] = pixels of region r (0 = normal) with score > thresholds[k].
    positives = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    sizes = hist.sum(axis=1)
    if sizes[0] == 0:
      raise ValueError(f"aupro_rd4ad: image {i} has no normal pixel, so its FPR is undefined")
    pro = (positives[1:] / sizes[1:, None]).mean(axis=0)
    fpr = positives[0] / sizes[0]
    keep = fpr < fpr_limit
    if keep.sum() < 2:
      raise ValueError(
        f"aupro_rd4ad: image {i} keeps {int(keep.sum())} thresholds with FPR < {fpr_limit}; "
        "the area needs at least 2"
      )
    fpr, pro = fpr[keep], pro[keep]
    if fpr.max() == 0:
      raise ValueError(
        f"aupro_rd4ad: every kept threshold of image {i} has FPR 0, so the FPR cannot be "
        "normalised by its maximum"
      )
    areas.append(auc(fpr / fpr.max(), pro))
  return float(np.mean(areas))
