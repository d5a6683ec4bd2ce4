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
  with Avenue's weights and edge padding, 0.2 off + 0.4 patch, smoothed again. Both errors come
  from :class:`HostFrameErrors` (frame differencing that removes static anomalies).
* ``dmad_shanghai`` (keys ``deformation``, ``reconstruction``, ``object``): per-video min-max
  and inversion, a 69-frame robust average per video (a video shorter than 69 frames becomes
  all ones, "normal", as the released ``conf_avg`` leaves it), a 55-frame one over the
  concatenation, 0.2/0.4/0.6 fusion, another 55-frame pass, then a per-video 1-D Kalman filter.
* ``mnad`` (keys ``neg_psnr``, ``feature_distance``): MNAD's test (spec Sec. 6): per-video
  min-max of -PSNR and of the feature distance, fused 0.6 / 0.4 (MNAD's min-max has no 1e-8 in
  the denominator; the difference is below any AUROC resolution). No smoothing.

The Avenue and ShanghaiTech recipes follow the spec's description of the released scripts; only
the Ped2 recipe could be checked against real scores on this machine (the other score files are
not available here). Per-video normalisation uses test-set statistics of each video, as the
published numbers do; it is part of the named recipes, never applied silently.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.ndimage
from sklearn.metrics import roc_auc_score

RECIPES = ("none", "dmad_ped2", "dmad_avenue", "dmad_shanghai", "mnad")
_KEYS = {
  "dmad_ped2": ("deformation", "reconstruction", "gradient"),
  "dmad_avenue": ("deformation", "patch"),
  "dmad_shanghai": ("deformation", "reconstruction", "object"),
  "mnad": ("neg_psnr", "feature_distance"),
}
# MNAD's fusion weight of the PSNR term (its test's --alpha); the feature distance gets 1 - it.
MNAD_ALPHA = 0.6
# Score-name prefix of each recipe's per-frame errors in the eval job's score dict (the model's
# predict() and HostFrameErrors write them; the eval job strips the prefix).
ERROR_PREFIX = {
  "dmad_ped2": "ped2_",
  "dmad_avenue": "avenue_",
  "dmad_shanghai": "shanghai_",
  "mnad": "mnad_",
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
  short: str = "unchanged",
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
    short: what a sequence shorter than ``size`` (no complete window) becomes: "unchanged", or
      "head" (every output is ``head``, a number: the released ShanghaiTech ``conf_avg``, whose
      output starts as ones and has no window to write).

  Returns:
    (T,) smoothed sequence.
  """
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  if n < size:
    if short == "head":
      return np.full(n, float(head))
    if short != "unchanged":
      raise ValueError(f"robust_moving_average: short must be 'unchanged' or 'head', got {short!r}")
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
  if recipe == "mnad":
    # MNAD's normality 0.6 * psnr_norm + 0.4 * (1 - dist_norm), per video, as an anomaly score:
    # min-max of -PSNR is 1 - psnr_norm.
    return MNAD_ALPHA * minmax_per_video(errors["neg_psnr"], video_lengths) + (
      1 - MNAD_ALPHA
    ) * minmax_per_video(errors["feature_distance"], video_lengths)
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
      # A video shorter than the window comes out as ones (normal), as in the released script.
      robust_moving_average(v, size=69, keep=25, offset=35, head=1.0, tail=1.0, short="head")
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
# Errors computed on the host, frame after frame (Avenue's frame differencing, ShanghaiTech's
# object error).
# ---------------------------------------------------------------------------------------------
def box_mean_max(x: np.ndarray, kernel_size: Sequence[int]) -> float:
  """NumPy twin of ``dmad_jax.ops.filters.box_filter_max`` for one (H, W) map ("Test_Loss"):
  |x| zero-padded by kh rows and kw columns on each side, box mean over kh x kw, maximum."""
  kh, kw = (int(k) for k in kernel_size)
  p = np.pad(np.abs(np.asarray(x, np.float64)), ((kh, kh), (kw, kw)))
  c = np.pad(p.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  s = c[kh:, kw:] - c[:-kh, kw:] - c[kh:, :-kw] + c[:-kh, :-kw]
  return float(s.max() / (kh * kw))


def shifted_min_difference(history: Sequence[np.ndarray], d: np.ndarray, radius: int = 1):
  """min over the maps in ``history`` and all shifts in [-radius, radius]^2 (zero fill) of
  |shifted - d|: what is left of ``d`` after removing whatever stood still (within ``radius``
  pixels) in one of the earlier maps."""
  h, w = d.shape
  out = None
  for prev in history:
    padded = np.pad(prev, radius)
    for row in range(2 * radius + 1):
      for col in range(2 * radius + 1):
        diff = np.abs(padded[row : row + h, col : col + w] - d)
        out = diff if out is None else np.minimum(out, diff)
  return out


class FrameDifference:
  """Streaming static-content removal of ``process_avenue.py``.

  Each pushed map is compared with the ``history`` maps before it, each shifted by up to
  ``radius`` pixels, and only the smallest absolute difference is kept, so an anomaly that stays
  in place (a bag left on the ground, a standing person) vanishes from the map while moving
  content remains.

  ``start="lookahead"`` (reconstruction maps): the history of the first frame is the first
  ``history`` maps themselves (so the first frames score 0), and each later frame pushes its
  predecessor in; outputs are emitted once ``history`` maps have arrived. ``start="zero"``
  (offset maps): the first frame gives a zero map, later frames use the frames before them.
  As in the official script the history runs over the concatenated test sequence, across video
  boundaries.
  """

  def __init__(self, history: int, radius: int = 1, start: str = "lookahead"):
    if history < 1 or radius < 0 or start not in ("lookahead", "zero"):
      raise ValueError(
        f"FrameDifference: need history >= 1, radius >= 0, start lookahead|zero; got "
        f"{history}, {radius}, {start!r}"
      )
    self.history, self.radius, self.start = int(history), int(radius), start
    self._hist: collections.deque = collections.deque(maxlen=self.history)
    self._pending: list[np.ndarray] | None = [] if start == "lookahead" else None
    self._prev = None

  def _step(self, d):
    if self._prev is not None:
      self._hist.appendleft(self._prev)
    self._prev = d
    if not self._hist:
      return np.zeros_like(d)
    return shifted_min_difference(self._hist, d, self.radius)

  def push(self, d: np.ndarray) -> list[np.ndarray]:
    """Adds the next frame's (H, W) map; returns the difference maps now ready, in order."""
    d = np.asarray(d, np.float64)
    if self._pending is None:
      return [self._step(d)]
    self._pending.append(d)
    return self.flush() if len(self._pending) == self.history else []

  def flush(self) -> list[np.ndarray]:
    """Emits the maps still waiting for the look-ahead history (call after the last push)."""
    if not self._pending:
      return []
    pending, self._pending = self._pending, None
    self._hist.extend(pending)
    self._prev = None
    out = [shifted_min_difference(self._hist, pending[0], self.radius)]
    self._prev = pending[0]
    out += [self._step(d) for d in pending[1:]]
    return out


def object_error(object_mask: np.ndarray, error: np.ndarray, *, min_area: float = 13) -> float:
  """ShanghaiTech's object error of one frame: the largest mean error inside a foreground object.

  Objects are the 8-connected components of ``object_mask`` with their holes filled (OpenCV's
  external contours, drawn filled). Components whose contour area is at most ``min_area`` are
  ignored; the contour area (the polygon through the boundary pixel centres, what
  ``cv2.contourArea`` measures) is computed with Pick's theorem, pixels - boundary / 2 - 1, so
  OpenCV is not needed (thin, one-pixel-wide shapes come out slightly larger than OpenCV's).

  Args:
    object_mask: (H, W) bool, the thresholded final mask.
    error: (H, W) channel-mean squared prediction error.
    min_area: minimal contour area of an object.

  Returns:
    The maximum over objects of the mean error inside, 0.0 when there is no object.
  """
  filled = scipy.ndimage.binary_fill_holes(np.asarray(object_mask, bool))
  labels, n = scipy.ndimage.label(filled, structure=np.ones((3, 3), bool))
  if n == 0:
    return 0.0
  flat = labels.ravel()
  pixels = np.bincount(flat, minlength=n + 1)[1:]
  sums = np.bincount(flat, weights=np.asarray(error, np.float64).ravel(), minlength=n + 1)[1:]
  boundary = filled & ~scipy.ndimage.binary_erosion(filled, border_value=0)
  edge = np.bincount(labels[boundary], minlength=n + 1)[1:]
  keep = pixels - edge / 2 - 1 > min_area
  return float((sums / pixels)[keep].max()) if keep.any() else 0.0


class HostFrameErrors:
  """Per-frame errors computed on the host from a model's ``host_maps``, frame by frame.

  The eval job feeds every batch in index order (``add``) and collects ``errors()`` at the end;
  only a few maps are held at any time, so memory does not grow with the test set.

  * ``dmad_avenue`` (``process_avenue.py``): ``patch`` = box-max (21x16) of the reconstruction
    difference map after :class:`FrameDifference` against the 3 previous maps;
    ``deformation`` = box-max (7x15) of the squared vertical offset map after differencing with
    the previous frame (maps ``diff`` / ``offset`` at half resolution).
  * ``dmad_shanghai``: ``object`` = :func:`object_error` (maps ``object_mask``, ``error``).

  Kernel sizes are for 256x256 frames (128x128 maps) and are scaled with the map size.
  """

  def __init__(self, recipe: str):
    self.recipe = recipe
    self._next = 0
    self._out: dict[str, list[float]] = collections.defaultdict(list)
    self._patch = FrameDifference(3, 1, "lookahead")
    self._offset = FrameDifference(1, 1, "zero")
    self._scale = 1.0

  def _kernel(self, ks):
    return tuple(max(1, round(k * self._scale)) for k in ks)

  def add(self, indices: np.ndarray, maps: Mapping[str, np.ndarray]) -> None:
    """Adds a batch of frames.

    Args:
      indices: (B,) record indices; they must continue the previous batch (0, 1, 2, ...).
      maps: name -> (B, h, w) maps of those frames.

    Raises:
      RuntimeError: if the frames do not arrive in order (the Avenue errors depend on the
        previous frames, so sharded multi-process evaluation is not supported).
    """
    indices = np.asarray(indices).reshape(-1)
    expected = np.arange(self._next, self._next + indices.size)
    if not np.array_equal(indices, expected):
      raise RuntimeError(
        f"HostFrameErrors ({self.recipe}): frames must arrive in order; expected indices "
        f"{self._next}..{self._next + indices.size - 1}, got {indices[:8].tolist()}..."
      )
    self._next += indices.size
    if self.recipe == "dmad_avenue":
      self._scale = maps["diff"].shape[1] / 128
      for d, o in zip(maps["diff"], maps["offset"], strict=True):
        for moved in self._patch.push(d):
          self._out["patch"].append(box_mean_max(moved, self._kernel((21, 16))))
        for moved in self._offset.push(o):
          self._out["deformation"].append(box_mean_max(moved, self._kernel((7, 15))))
    elif self.recipe == "dmad_shanghai":
      for m, e in zip(maps["object_mask"], maps["error"], strict=True):
        self._out["object"].append(object_error(m, e))

  def errors(self) -> dict[str, np.ndarray]:
    """The accumulated errors, named with the recipe's ``ERROR_PREFIX`` ({} for other recipes)."""
    for moved in self._patch.flush():
      self._out["patch"].append(box_mean_max(moved, self._kernel((21, 16))))
    prefix = ERROR_PREFIX.get(self.recipe, "")
    return {f"{prefix}{k}": np.asarray(v, np.float64) for k, v in self._out.items()}


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
