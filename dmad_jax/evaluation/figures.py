"""Qualitative evaluation figures: DMAD-style deformation panels, anomaly-map overlays with
ground-truth contours, score histograms, and the per-image heatmaps of ``dmad predict``.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas instead of `pyplot`, so they
work headless, never touch the global backend or the pyplot figure registry, and need no closing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dmad_jax.evaluation.metrics import image_auroc

__all__ = [
  "FigureRows",
  "deformation_panel",
  "heatmap_overlays",
  "prediction_overlay",
  "score_histogram",
]

# Inches per image cell; with _DPI this is ~120 px, enough to see 256 px detail in a grid of 16.
_CELL_IN = 1.6
_DPI = 75


def _save(fig: Figure, path: str | os.PathLike) -> str:
  """Writes ``fig`` as a PNG at ``path`` (creating parent dirs) and returns the path as str."""
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, format="png", dpi=fig.dpi)
  return path


def pick_rows(labels, n_per_class: int) -> np.ndarray:
  """Positions of the first ``n_per_class`` normal, then the first ``n_per_class`` anomalous
  records: the columns of the eval figures."""
  labels = np.asarray(labels)
  normal = np.flatnonzero(labels == 0)[:n_per_class]
  anomalous = np.flatnonzero(labels == 1)[:n_per_class]
  return np.concatenate([normal, anomalous])


class FigureRows:
  """The pictures of the records the eval figures show, collected batch by batch.

  Only rows the figures still need are kept (in order, while their class has fewer than
  ``n_per_class``), so memory stays flat however long a test set runs before its first anomaly,
  and :meth:`picked` equals picking from every record at once.
  """

  def __init__(self, n_per_class: int):
    self.n = int(n_per_class)
    self._labels: list[np.ndarray] = []
    self._scores: list[np.ndarray] = []
    self._groups: dict[str, dict[str, list[np.ndarray]]] = {}

  def needed(self, labels) -> np.ndarray:
    """Positions in a batch with ``labels`` of the rows to keep."""
    kept = np.concatenate(self._labels) if self._labels else np.zeros((0,), np.int32)
    have = {c: int((kept == c).sum()) for c in (0, 1)}
    rows = []
    for i, c in enumerate(np.asarray(labels).tolist()):
      if c in have and have[c] < self.n:
        have[c] += 1
        rows.append(i)
    return np.asarray(rows, np.int64)

  def add(self, labels, scores, groups: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Keeps the needed rows of a batch: its ``labels``, main ``scores`` and pictures, given as
    ``{group: {name: (B, ...) array}}`` (e.g. "images", "maps", "inputs", "masks")."""
    rows = self.needed(labels)
    if not rows.size:
      return
    self._labels.append(np.asarray(labels)[rows])
    self._scores.append(np.asarray(scores)[rows])
    for group, arrays in groups.items():
      for name, values in arrays.items():
        self._groups.setdefault(group, {}).setdefault(name, []).append(np.asarray(values)[rows])

  def picked(self) -> tuple[np.ndarray, np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """(labels, scores, groups) of the figure's records: normal ones first."""
    if not self._labels:
      return np.zeros((0,), np.int32), np.zeros((0,), np.float32), {}
    labels = np.concatenate(self._labels)
    order = pick_rows(labels, self.n)
    groups = {
      g: {k: np.concatenate(v)[order] for k, v in arrays.items()}
      for g, arrays in self._groups.items()
    }
    return labels[order], np.concatenate(self._scores)[order], groups


def _to_display(images: np.ndarray, name: str) -> np.ndarray:
  """Maps an (N, H, W, C) batch in [-1, 1] to (N, H, W) gray or (N, H, W, 3) RGB in [0, 1]."""
  images = np.asarray(images, dtype=np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"row {name!r} must be (N, H, W, 1|3) in [-1, 1], got shape {images.shape}")
  # Clip after rescaling: reconstructions overshoot [-1, 1] slightly and imshow would warn.
  images = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
  return images[..., 0] if images.shape[-1] == 1 else images


def deformation_panel(
  path: str | os.PathLike,
  rows: Mapping[str, np.ndarray],
  *,
  labels=None,
  scores=None,
  maps: Mapping[str, np.ndarray] | None = None,
  title: str | None = None,
) -> str:
  """Saves a DMAD Fig. 6-style grid of samples and their deformation stages.

  Each column is one sample; each row is one entry of ``rows`` in insertion order (for example
  ``input``, ``reference``, ``coarse``, ``fine``), followed by one row per entry of ``maps``.
  Maps are drawn with the ``jet`` colormap on a single colour scale shared by the whole panel, so
  values are comparable across samples and across map rows; NaN/inf pixels are left blank.

  Args:
    path: Output PNG path; parent directories are created.
    rows: Mapping from row name to an (N, H, W, C) array in [-1, 1], C = 1 (gray) or 3 (RGB). All
      rows must share N; H and W may differ between rows.
    labels: Optional N labels, 0 = normal, 1 = anomalous, shown in the column titles.
    scores: Optional N anomaly scores, shown in the column titles.
    maps: Optional mapping from name to an (N, H, W) array (e.g. ``"anomaly map"``).
    title: Optional figure title.

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: If ``rows`` is empty, shapes are wrong, or N differs between inputs.
  """
  if not rows:
    raise ValueError("rows must contain at least one image batch")
  images = {name: _to_display(batch, name) for name, batch in rows.items()}
  n = next(iter(images.values())).shape[0]
  heat = {}
  for name, values in (maps or {}).items():
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 4 and values.shape[-1] == 1:
      values = values[..., 0]
    if values.ndim != 3:
      raise ValueError(f"map {name!r} must be (N, H, W), got shape {values.shape}")
    heat[name] = values
  for kind, batches in (("row", images), ("map", heat)):
    for name, batch in batches.items():
      if batch.shape[0] != n:
        raise ValueError(f"{kind} {name!r} has {batch.shape[0]} samples, expected {n}")
  for kind, values in (("labels", labels), ("scores", scores)):
    if values is not None and np.asarray(values).reshape(-1).shape[0] != n:
      raise ValueError(f"{kind} has {np.asarray(values).size} entries, expected {n}")

  # One colour scale for all maps; finite values only so a single NaN cannot blank the panel.
  vmin, vmax = 0.0, 1.0
  if heat:
    finite = np.concatenate([v[np.isfinite(v)] for v in heat.values()])
    if finite.size:
      vmin, vmax = float(finite.min()), float(finite.max())
      if vmax <= vmin:
        vmax = vmin + 1e-6

  n_rows = len(images) + len(heat)
  title_in = 0.5 if title else 0.0
  fig = Figure(figsize=(_CELL_IN * n + 1.0, _CELL_IN * n_rows + 0.4 + title_in), dpi=_DPI)
  axes = fig.subplots(n_rows, n, squeeze=False)
  mappable = None
  all_rows = [(name, batch, False) for name, batch in images.items()]
  all_rows += [(name, batch, True) for name, batch in heat.items()]
  label_arr = None if labels is None else np.asarray(labels).reshape(-1)
  score_arr = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
  for r, (name, batch, is_map) in enumerate(all_rows):
    for c in range(n):
      ax = axes[r, c]
      if is_map:
        img = np.ma.masked_invalid(batch[c])
        mappable = ax.imshow(img, cmap="jet", vmin=vmin, vmax=vmax, interpolation="nearest")
      elif batch.ndim == 3:
        ax.imshow(batch[c], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
      else:
        ax.imshow(batch[c], interpolation="nearest")
      # Hide ticks but keep the axis so set_ylabel still draws the row name.
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(name, fontsize=9)
      if r == 0:
        parts = []
        if label_arr is not None:
          parts.append("anomalous" if int(label_arr[c]) == 1 else "normal")
        if score_arr is not None:
          parts.append(f"{score_arr[c]:.3g}")
        if parts:
          ax.set_title("\n".join(parts), fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  # The colorbar goes into a reserved right margin next to the map rows, so it does not shrink the
  # last column of images the way `fig.colorbar(ax=...)` would.
  right = 1.0 - 0.7 / fig.get_figwidth() if mappable is not None else 1.0
  fig.tight_layout(rect=(0.0, 0.0, right, 1.0))
  if mappable is not None:
    top = axes[len(images), -1].get_position()
    bottom = axes[-1, -1].get_position()
    cax = fig.add_axes(
      (right + 0.1 / fig.get_figwidth(), bottom.y0, 0.15 / fig.get_figwidth(), top.y1 - bottom.y0)
    )
    fig.colorbar(mappable, cax=cax)
  return _save(fig, path)


def score_histogram(
  path: str | os.PathLike,
  scores,
  labels,
  *,
  title: str | None = None,
  score_name: str = "score",
) -> str:
  """Saves overlaid histograms of the normal and anomalous scores on shared bins.

  Args:
    path: Output PNG path; parent directories are created.
    scores: N anomaly scores, higher = more anomalous. Non-finite values are dropped from the
      plot and their count is shown in the legend.
    labels: N labels, 0 = normal, 1 = anomalous.
    title: Optional title; the AUROC is appended when both classes are present.
    score_name: Label for the x axis.

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: If ``scores`` and ``labels`` have different lengths or a label is not 0/1.
  """
  scores = np.asarray(scores, dtype=np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if scores.shape[0] != labels.shape[0]:
    raise ValueError(
      f"scores and labels must have the same length, got {scores.shape[0]} and {labels.shape[0]}"
    )
  if not np.isin(labels, (0, 1)).all():
    raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
  labels = labels.astype(np.int64)
  finite = np.isfinite(scores)
  normal = scores[finite & (labels == 0)]
  anomalous = scores[finite & (labels == 1)]
  # Shared bins so bar heights of the two classes are directly comparable.
  if finite.any():
    lo, hi = float(scores[finite].min()), float(scores[finite].max())
    if hi <= lo:
      lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
  else:
    bins = np.linspace(0.0, 1.0, 31)

  fig = Figure(figsize=(6.0, 4.0), dpi=100)
  ax = fig.add_subplot()
  ax.hist(normal, bins=bins, alpha=0.6, color="tab:blue", label=f"normal (n={normal.size})")
  ax.hist(anomalous, bins=bins, alpha=0.6, color="tab:red", label=f"anomalous (n={anomalous.size})")
  n_bad = int((~finite).sum())
  if n_bad:
    ax.plot([], [], " ", label=f"non-finite dropped (n={n_bad})")
  ax.set_xlabel(score_name)
  ax.set_ylabel("count")
  ax.legend(fontsize=8)
  parts = [title] if title else []
  if normal.size and anomalous.size:
    parts.append(f"AUROC = {image_auroc(scores[finite], labels[finite]):.4f}")
  if parts:
    ax.set_title(" | ".join(parts), fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def heatmap_overlays(
  path: str | os.PathLike,
  images: np.ndarray,
  maps: np.ndarray,
  masks: np.ndarray,
  *,
  scores=None,
  labels=None,
  title: str | None = None,
  cmap: str = "jet",
  alpha: float = 0.5,
) -> str:
  """Saves, per sample, the image and its anomaly-map overlay, both with the ground-truth contour.

  One column per sample; the top row is the image, the bottom row the image under the anomaly map
  (``cmap`` at opacity ``alpha``, as anomalib's ``image+anomaly_map`` panel). The ground-truth
  region boundary is drawn as a white contour at mask level 0.5 on both rows (no contour on normal
  images). All maps share one colour scale (min to max of the finite values shown), so the maps of
  normal and anomalous samples are comparable; NaN/inf pixels are left transparent.

  Args:
    path: Output PNG path; parent directories are created.
    images: ``(N, H, W, C)`` in [-1, 1], C = 1 or 3.
    maps: ``(N, H, W)`` anomaly maps, higher = more anomalous.
    masks: ``(N, H, W)`` ground truth, 0/1 or bool.
    scores: Optional N image scores, shown in the column titles.
    labels: Optional N labels, 0 = normal, 1 = anomalous, shown in the column titles.
    title: Optional figure title.
    cmap: Matplotlib colormap of the maps.
    alpha: Opacity of the map over the image.

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: If the shapes disagree (N, H or W) or an input has the wrong rank.
  """
  shown = _to_display(images, "images")
  n, h, w = shown.shape[:3]
  maps = np.asarray(maps, dtype=np.float32)
  masks = np.asarray(masks, dtype=np.float32)
  for name, values in (("maps", maps), ("masks", masks)):
    if values.shape != (n, h, w):
      raise ValueError(
        f"{name} must have shape {(n, h, w)} to match the images, got {values.shape}"
      )
  for kind, values in (("labels", labels), ("scores", scores)):
    if values is not None and np.asarray(values).reshape(-1).shape[0] != n:
      raise ValueError(f"{kind} has {np.asarray(values).size} entries, expected {n}")
  finite = maps[np.isfinite(maps)]
  vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  if vmax <= vmin:
    vmax = vmin + 1e-6

  title_in = 0.5 if title else 0.0
  fig = Figure(
    figsize=(_CELL_IN * n + 1.0, 2 * _CELL_IN + 0.5 + title_in), dpi=_DPI, layout="constrained"
  )
  axes = fig.subplots(2, n, squeeze=False)
  label_arr = None if labels is None else np.asarray(labels).reshape(-1)
  score_arr = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
  mappable = None
  for c in range(n):
    gray = shown[c].ndim == 2
    for r in range(2):
      ax = axes[r, c]
      ax.imshow(shown[c], cmap="gray" if gray else None, vmin=0.0, vmax=1.0)
      if r == 1:
        mappable = ax.imshow(
          np.ma.masked_invalid(maps[c]), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax
        )
      # A contour needs both levels present; normal images have no region to outline.
      if masks[c].min() < 0.5 < masks[c].max():
        ax.contour(masks[c], levels=[0.5], colors="white", linewidths=1.0)
      ax.set_xticks([])
      ax.set_yticks([])
    parts = []
    if label_arr is not None:
      parts.append("anomalous" if int(label_arr[c]) == 1 else "normal")
    if score_arr is not None:
      parts.append(f"{score_arr[c]:.3g}")
    if parts:
      axes[0, c].set_title("\n".join(parts), fontsize=8)
  axes[0, 0].set_ylabel("image + GT", fontsize=9)
  axes[1, 0].set_ylabel("anomaly map", fontsize=9)
  fig.colorbar(mappable, ax=axes[1, :].tolist(), fraction=0.05, pad=0.01)
  if title:
    fig.suptitle(title, fontsize=10)
  return _save(fig, path)


def prediction_overlay(
  path: str | os.PathLike,
  image: np.ndarray,
  amap: np.ndarray,
  *,
  vmin: float | None = None,
  vmax: float | None = None,
  title: str | None = None,
  cmap: str = "jet",
  alpha: float = 0.5,
) -> str:
  """Saves one image next to the image under its anomaly map (``dmad predict``'s heatmap).

  Unlike :func:`heatmap_overlays`, whose colour scale spans the maps shown, the scale here is
  fixed by the caller (the calibration's range of normal maps), so one image's map reads the
  same in every file; values outside ``[vmin, vmax]`` saturate.

  Args:
    path: Output PNG path; parent directories are created.
    image: ``(H, W, C)`` in [-1, 1], C = 1 or 3.
    amap: ``(H, W)`` anomaly map, higher = more anomalous; NaN/inf pixels are transparent.
    vmin: Low end of the colour scale (default: the map's finite minimum).
    vmax: High end (default: the map's finite maximum).
    title: Optional figure title (e.g. the score against the threshold).
    cmap: Matplotlib colormap of the map.
    alpha: Opacity of the map over the image.

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: If the map's shape is not the image's ``(H, W)``.
  """
  shown = _to_display(np.asarray(image)[None], "image")[0]
  amap = np.asarray(amap, dtype=np.float32)
  if amap.shape != shown.shape[:2]:
    raise ValueError(f"map must have shape {shown.shape[:2]} to match the image, got {amap.shape}")
  finite = amap[np.isfinite(amap)]
  lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else vmin)
  hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else vmax)
  if hi <= lo:
    hi = lo + 1e-6
  title_in = 0.25 * (title.count("\n") + 1) if title else 0.0
  fig = Figure(figsize=(2 * 2.4 + 0.8, 2.6 + title_in), dpi=100, layout="constrained")
  axes = fig.subplots(1, 2)
  gray = shown.ndim == 2
  mappable = None
  for ax, name in zip(axes, ("image", "anomaly map"), strict=True):
    ax.imshow(shown, cmap="gray" if gray else None, vmin=0.0, vmax=1.0)
    if name == "anomaly map":
      mappable = ax.imshow(np.ma.masked_invalid(amap), cmap=cmap, alpha=alpha, vmin=lo, vmax=hi)
    ax.set_title(name, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(mappable, ax=axes[1], fraction=0.05, pad=0.02)
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)
