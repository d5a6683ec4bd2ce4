"""Frame-level video evaluation: the official DMAD score recipes, frame labels and AUROC.

``score_frames(errors, video_lengths=..., recipe=...)`` turns per-frame errors (higher = more
anomalous, concatenated over videos in sorted video order) into one anomaly score per frame
(higher = more anomalous). The recipes reproduce the official DMAD post-processing
(shared/spec/seed_systems.md Sec. 1.6):

* ``none``: per-video min-max of each error, summed.
* ``dmad_ped2`` (keys ``deformation``, ``reconstruction``, ``gradient``): per-video min-max,
  inverted to normality; each list smoothed by a robust moving average over the *concatenated*
  sequence (window 11, keep the 5 values closest to the window mean, weights peaked at the
  centre); normality 0.2 s_df + 0.4 s_rec + 0.6 s_grad. Verified here against the authors'
  Ped2 score file: frame AUROC 0.99690.
* ``dmad_avenue`` (keys ``deformation``, ``patch``): global min-max, the same kind of smoothing
  with Avenue's weights and edge padding, 0.2 off + 0.4 patch, smoothed again.
* ``dmad_shanghai`` (keys ``deformation``, ``reconstruction``, ``object``): per-video min-max
  and inversion, a 69-frame robust average per video, a 55-frame one over the concatenation,
  0.2/0.4/0.6 fusion, another 55-frame pass, then a per-video 1-D Kalman filter.

The Avenue and ShanghaiTech recipes follow the spec's description of the released scripts; only
the Ped2 recipe could be checked against real scores on this machine (the other score files are
not available here). Per-video normalisation uses test-set statistics of each video, as the
published numbers do; it is part of the named recipes, never applied silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

RECIPES = ("none", "dmad_ped2", "dmad_avenue", "dmad_shanghai")
_KEYS = {
  "dmad_ped2": ("deformation", "reconstruction", "gradient"),
  "dmad_avenue": ("deformation", "patch"),
  "dmad_shanghai": ("deformation", "reconstruction", "object"),
}
PED2_WEIGHTS = (1, 1, 1, 1, 1.2, 1.6, 1.2, 1, 1, 1, 1)
AVENUE_WEIGHTS = (0.5, 0.8, 0.8, 1, 1, 2.5, 1, 1, 0.8, 0.8, 0.5)


# ---------------------------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------------------------
def split_videos(x: np.ndarray, video_lengths: Sequence[int]) -> list[np.ndarray]:
  """Splits a concatenated per-frame array into its videos."""
  return np.split(np.asarray(x, np.float64), np.cumsum(video_lengths)[:-1])


def minmax_per_video(x: np.ndarray, video_lengths: Sequence[int]) -> np.ndarray:
  """(e - min) / (max - min + 1e-8) within each video (the official normalisation)."""
  return np.concatenate(
    [(v - v.min()) / (v.max() - v.min() + 1e-8) for v in split_videos(x, video_lengths)]
  )


def minmax_global(x: np.ndarray) -> np.ndarray:
  """(e - min) / (max - min + 1e-8) over the whole sequence."""
  x = np.asarray(x, np.float64)
  return (x - x.min()) / (x.max() - x.min() + 1e-8)


def robust_moving_average(
  x: np.ndarray,
  *,
  size: int,
  keep: int,
  weights: Sequence[float] | None = None,
  offset: int | None = None,
  head: float | str = 1.0,
  tail: float | str = "last",
) -> np.ndarray:
  """DMAD's ``conf_avg``: in every window of ``size`` frames keep the ``keep`` values closest to
  the window mean and take their weighted mean.

  Args:
    x: (T,) sequence.
    size: window length.
    keep: how many values of each window are averaged.
    weights: per-position weights of the window (None: all 1); only the kept ones are used.
    offset: the window starting at i writes output i + offset (default size // 2, the centre;
      the ShanghaiTech script uses (size + 1) // 2).
    head: value of the outputs before the first written one: a number, or "edge" for the first
      written value.
    tail: value of the outputs after the last written one: a number, "edge" for the last
      written value, or "last" for the last input value.

  Returns:
    (T,) smoothed sequence. Sequences shorter than ``size`` are returned unchanged.
  """
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  if n < size:
    return x.copy()
  w = np.ones(size) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (size,):
    raise ValueError(f"robust_moving_average: {len(w)} weights for a window of {size}")
  offset = size // 2 if offset is None else offset
  win = np.lib.stride_tricks.sliding_window_view(x, size)  # (n - size + 1, size)
  dist = np.abs(win - win.mean(axis=1, keepdims=True))
  idx = np.argsort(dist, axis=1, kind="stable")[:, :keep]
  vals = np.take_along_axis(win, idx, axis=1)
  ws = w[idx]
  smoothed = (vals * ws).sum(axis=1) / ws.sum(axis=1)
  out = np.empty(n)
  start, stop = offset, offset + smoothed.shape[0]
  out[start:stop] = smoothed[: n - start]
  out[:start] = smoothed[0] if head == "edge" else float(head)
  if stop < n:
    if tail == "edge":
      out[stop:] = smoothed[-1]
    elif tail == "last":
      out[stop:] = x[-1]
    else:
      out[stop:] = float(tail)
  return out


def kalman_1d(z: np.ndarray, *, q: float = 1e-5, r: float = 1e-4) -> np.ndarray:
  """Scalar random-walk Kalman filter as in the ShanghaiTech script (xhat0 = 0, P0 = 1; the
  first output is replaced by z[0])."""
  z = np.asarray(z, np.float64)
  xhat = np.zeros_like(z)
  p = 1.0
  for k in range(1, z.shape[0]):
    p_minus = p + q
    gain = p_minus / (p_minus + r)
    xhat[k] = xhat[k - 1] + gain * (z[k] - xhat[k - 1])
    p = (1 - gain) * p_minus
  if z.shape[0]:
    xhat[0] = z[0]
  return xhat


# ---------------------------------------------------------------------------------------------
# Recipes.
# ---------------------------------------------------------------------------------------------
def _check(errors, video_lengths, recipe):
  if recipe not in RECIPES:
    raise ValueError(f"score_frames: unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
  total = int(np.sum(video_lengths))
  for k, v in errors.items():
    if np.asarray(v).shape != (total,):
      raise ValueError(
        f"score_frames: error {k!r} has shape {np.asarray(v).shape}, expected ({total},) = the "
        f"sum of {len(video_lengths)} video lengths"
      )
  missing = [k for k in _KEYS.get(recipe, ()) if k not in errors]
  if missing:
    raise ValueError(
      f"score_frames: recipe {recipe} needs errors {_KEYS[recipe]}, missing {missing}"
    )


def score_frames(
  errors: Mapping[str, np.ndarray], *, video_lengths: Sequence[int], recipe: str
) -> np.ndarray:
  """Per-frame anomaly scores (higher = more anomalous) from per-frame errors.

  Args:
    errors: name -> (T,) errors concatenated over videos in sorted video order, higher = more
      anomalous.
    video_lengths: number of scored frames of each video, in the same order (sum = T).
    recipe: one of ``RECIPES`` (see the module docstring).

  Returns:
    (T,) float64 scores.

  Raises:
    ValueError: on an unknown recipe, missing error keys or lengths that do not add up.
  """
  _check(errors, video_lengths, recipe)
  if recipe == "none":
    return sum(minmax_per_video(v, video_lengths) for v in errors.values())
  if recipe == "dmad_ped2":
    smooth = {
      k: robust_moving_average(
        1 - minmax_per_video(errors[k], video_lengths), size=11, keep=5, weights=PED2_WEIGHTS
      )
      for k in _KEYS[recipe]
    }
    normality = 0.2 * smooth["deformation"] + 0.4 * smooth["reconstruction"]
    normality = normality + 0.6 * smooth["gradient"]
    return 1.2 - normality
  if recipe == "dmad_avenue":
    kw = dict(size=11, keep=5, weights=AVENUE_WEIGHTS, head="edge", tail="edge")
    off = robust_moving_average(minmax_global(errors["deformation"]), **kw)
    patch = robust_moving_average(minmax_global(errors["patch"]), **kw)
    return robust_moving_average(0.2 * off + 0.4 * patch, **kw)
  # dmad_shanghai
  lists = {}
  for k in _KEYS[recipe]:
    inv = 1 - minmax_per_video(errors[k], video_lengths)
    per_video = [
      robust_moving_average(v, size=69, keep=25, offset=35, head=1.0, tail=1.0)
      for v in split_videos(inv, video_lengths)
    ]
    lists[k] = robust_moving_average(
      np.concatenate(per_video), size=55, keep=49, offset=28, head=1.0, tail=1.0
    )
  comb = 0.2 * lists["deformation"] + 0.4 * lists["reconstruction"] + 0.6 * lists["object"]
  comb = robust_moving_average(comb, size=55, keep=27, offset=28, head=1.0, tail=1.0)
  filtered = np.concatenate([kalman_1d(v) for v in split_videos(comb, video_lengths)])
  return 1.2 - filtered


# ---------------------------------------------------------------------------------------------
# AUROC and labels.
# ---------------------------------------------------------------------------------------------
def frame_auroc(
  scores: np.ndarray, labels: np.ndarray, video_lengths: Sequence[int]
) -> dict[str, float]:
  """Frame-level AUROC, micro (all frames pooled) and macro (mean of per-video AUROCs).

  For the macro average each video's scores are min-max normalised and one normal frame scored
  0 and one anomalous frame scored 1 are appended, so that videos holding a single class (common
  in Avenue) still have an AUROC, as in the SSMTL/SSPCAB evaluation code.

  Returns:
    {"frame_AUROC_micro", "frame_AUROC_macro", "num_frames", "num_anomalous"}.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(np.int64).ravel()
  if scores.shape != labels.shape:
    raise ValueError(f"frame_auroc: {scores.shape[0]} scores but {labels.shape[0]} labels")
  per_video = []
  for s, y in zip(
    split_videos(scores, video_lengths), split_videos(labels, video_lengths), strict=True
  ):
    s = (s - s.min()) / (s.max() - s.min() + 1e-8)
    per_video.append(roc_auc_score(np.r_[y, 0, 1], np.r_[s, 0.0, 1.0]))
  return {
    "frame_AUROC_micro": float(roc_auc_score(labels, scores)),
    "frame_AUROC_macro": float(np.mean(per_video)),
    "num_frames": int(labels.shape[0]),
    "num_anomalous": int(labels.sum()),
  }


def load_frame_labels(
  path: str, video_lengths: Sequence[int], *, skip_first: int = 4
) -> np.ndarray:
  """Frame labels (1 = anomalous) for the scored frames of every video, concatenated.

  Accepts DMAD's trimmed ``.npy`` (one label per scored frame) and MNAD's untrimmed ``.npy``
  (one per frame: the first ``skip_first`` frames of each video are dropped here).

  Args:
    path: the label file.
    video_lengths: scored frames per video (frames - skip_first).
    skip_first: frames per video that have no prediction (t_length - 1).

  Returns:
    (sum(video_lengths),) int array.

  Raises:
    ValueError: when the label count fits neither layout, listing the frames per video.
  """
  labels = np.asarray(np.load(path)).astype(np.int64).ravel()
  scored = int(np.sum(video_lengths))
  full = scored + skip_first * len(video_lengths)
  if labels.shape[0] == scored:
    return labels
  if labels.shape[0] == full:
    parts = split_videos(labels, [n + skip_first for n in video_lengths])
    return np.concatenate([p[skip_first:] for p in parts]).astype(np.int64)
  raise ValueError(
    f"{os.path.abspath(path)}: {labels.shape[0]} labels, but the {len(video_lengths)} videos "
    f"have {scored} scored frames ({full} with the first {skip_first} of each); scored frames "
    f"per video: {list(map(int, video_lengths))}"
  )


def plot_video_scores(
  path: str, scores: np.ndarray, labels: np.ndarray, video_lengths: Sequence[int], *, title=""
) -> str:
  """One panel per video: the score curve with the anomalous frames shaded. Returns ``path``."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  n = len(video_lengths)
  cols = min(4, n)
  rows = -(-n // cols)
  fig = Figure(figsize=(4 * cols, 2.2 * rows))
  FigureCanvasAgg(fig)
  s_all, y_all = split_videos(scores, video_lengths), split_videos(labels, video_lengths)
  for i, (s, y) in enumerate(zip(s_all, y_all, strict=True)):
    ax = fig.add_subplot(rows, cols, i + 1)
    t = np.arange(len(s))
    ax.fill_between(
      t,
      0,
      1,
      where=y > 0,
      color="tab:red",
      alpha=0.25,
      step="mid",
      transform=ax.get_xaxis_transform(),
      linewidth=0,
    )
    ax.plot(t, s, color="tab:blue", linewidth=1)
    ax.set_title(f"video {i + 1}", fontsize=8)
    ax.tick_params(labelsize=6)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
