"""Random-access source over surveillance-video frame dumps (Ped2 / Avenue / ShanghaiTech).

Expected layout (the FramePred / MNAD / DMAD frame dump)::

  <root>/training/frames/<video>/<n>.jpg     normal training videos
  <root>/testing/frames/<video>/<n>.jpg      test videos (labels come from a separate file)

Videos are taken in sorted folder order (the order every published label array assumes) and
frames in the numeric order of the integer in their file stem, so ``2.jpg`` precedes ``10.jpg``.
Folders named ``*_gt`` are not videos (UCSD's mask folders), so the raw ``UCSDped2/Train`` and
``UCSDped2/Test`` folders of ``.tif`` frames can be linked as ``training/frames`` and
``testing/frames`` directly.

A record is a clip of ``t_length`` consecutive frames whose last frame is the prediction target::

  {"frames": float32 (S, S, 3 * t_length) in [-1, 1], oldest frame first, 3 channels each,
   "image": float32 (S, S, 3), the target (last) frame,
   "label": int32 label of the target frame (1 = anomalous), "index": int32 clip index,
   "video": int32 video index, "frame": int32 target frame index inside its video,
   "template_index": int32 index of the video's background template (0 unless the source was
   built by :func:`video_sources` with per-scene or per-video templates)}

Labels are read from DMAD's trimmed ``.npy``, MNAD's untrimmed ``.npy``, a folder of per-video
``<video>.npy`` (ShanghaiTech ``test_frame_mask`` / ``test_pixel_mask``), a FramePred ``.mat``
(key ``gt``) or anomalib's raw layouts (UCSD ``Test*_gt/*.bmp`` masks, Avenue
``testing_label_mask/<n>_label.mat`` with ``volLabel``); see :func:`load_frame_labels`.
:func:`video_sources` builds both splits and gives every video a background-template index (one
template, one per scene, or one per video); :func:`estimate_template`, :func:`template_bank` and
:func:`video_templates` build DMAD's background templates, and
``python -m dmad_jax.data.video extract IN.avi OUTDIR`` dumps the frames of a video file (needs
``opencv-python-headless``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import threading
from collections.abc import Sequence

import numpy as np
import scipy.io
import scipy.ndimage

from dmad_jax.data.base import check_index, describe_source
from dmad_jax.data.images import IMAGE_EXTENSIONS, check_image_options, load_image, to_unit_range

SPLIT_ALIASES = {
  "training": "training",
  "testing": "testing",
  "train": "training",
  "test": "testing",
}

_LAYOUT = (
  "expected layout:\n"
  "  <root>/training/frames/<video>/<n>.jpg\n"
  "  <root>/testing/frames/<video>/<n>.jpg"
)

# OpenCV's getGaussianKernel(13, 0) rule, which DMAD's gen_bkg uses to smooth the histograms.
HIST_KERNEL_SIZE = 13
HIST_KERNEL_SIGMA = 0.3 * ((HIST_KERNEL_SIZE - 1) / 2 - 1) + 0.8  # = 2.3


def _frame_number(path: str) -> int:
  """The integer in a frame file's stem (the last run of digits, so ``img_0012`` -> 12)."""
  digits = re.findall(r"\d+", os.path.splitext(os.path.basename(path))[0])
  if not digits:
    raise ValueError(f"frame file {path!r} has no frame number in its name")
  return int(digits[-1])


def _video_dirs(frames_dir: str) -> list[str]:
  """Sorted video folder names of a frames folder; hidden folders and UCSD's ``*_gt`` mask
  folders (so that ``UCSDped2/Test`` itself can serve as ``testing/frames``) are skipped."""
  with os.scandir(frames_dir) as entries:
    return sorted(
      e.name
      for e in entries
      if e.is_dir() and not e.name.startswith(".") and not e.name.endswith("_gt")
    )


def list_frames(video_dir: str) -> list[str]:
  """Image files of one video folder in numeric frame order.

  Args:
    video_dir: a folder such as ``<root>/testing/frames/01``.

  Returns:
    The frame paths sorted by the integer in their stem; non-image and hidden files are ignored.

  Raises:
    ValueError: if a frame name holds no number or two frames share a number.
  """
  with os.scandir(video_dir) as entries:
    paths = [
      e.path
      for e in entries
      if e.is_file()
      and not e.name.startswith(".")
      and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
    ]
  numbered = sorted((_frame_number(p), p) for p in paths)
  for (a, pa), (b, pb) in zip(numbered, numbered[1:], strict=False):
    if a == b:
      # Two files for one frame (e.g. 7.jpg and 7.png) would shift every later label.
      raise ValueError(f"frames {pa!r} and {pb!r} have the same frame number {a}")
  return [p for _, p in numbered]


def _per_frame_from_intervals(intervals, num_frames: int, where: str) -> np.ndarray:
  """0/1 per frame from a FramePred ``2 x K`` array of 1-indexed inclusive [start; end] rows."""
  arr = np.asarray(intervals, dtype=np.float64)
  labels = np.zeros(num_frames, np.int32)
  if arr.size == 0:
    return labels
  if arr.ndim != 2 or arr.shape[0] != 2:
    if arr.ndim == 2 and arr.shape[1] == 2:
      arr = arr.T  # Some conversions store K x 2; the content is the same.
    else:
      raise ValueError(f"{where}: expected a 2 x K array of [start; end] rows, got {arr.shape}")
  for start, end in arr.T.astype(np.int64):
    # 1-indexed inclusive [start, end] is the 0-indexed slice [start - 1, end); slicing clips
    # an end past the last frame as FramePred's evaluate.py does.
    labels[max(int(start) - 1, 0) : int(end)] = 1
  return labels


def _mismatch(path: str, found: str, videos, frame_counts, skip_first: int) -> ValueError:
  """The error for a label file that fits none of the known layouts."""
  counts = ", ".join(f"{v}: {int(n)}" for v, n in zip(videos, frame_counts, strict=True))
  total = int(np.sum(frame_counts))
  scored = total - skip_first * len(videos)
  return ValueError(
    f"labels {path!r} do not match the frames: found {found}; frames per video ({len(videos)} "
    f"videos): {counts}; expected {scored} labels (one per scored frame, first {skip_first} "
    f"of each video dropped, DMAD) or {total} (one per frame, MNAD)"
  )


def _name_number(name: str) -> int | None:
  """The last run of digits in a name as an int (``Test001`` -> 1), or None."""
  digits = re.findall(r"\d+", name)
  return int(digits[-1]) if digits else None


def _ucsd_mask_dirs(path: str) -> dict[str, str]:
  """``{video: folder}`` of anomalib's UCSD ``<video>_gt`` mask folders in ``path`` or
  ``path/Test`` (empty when there are none)."""
  for base in (path, os.path.join(path, "Test")):
    if not os.path.isdir(base):
      continue
    with os.scandir(base) as entries:
      found = {
        e.name[: -len("_gt")]: e.path for e in entries if e.is_dir() and e.name.endswith("_gt")
      }
    if found:
      return found
  return {}


_AVENUE_MAT = re.compile(r"^(.+)_label\.mat$", re.IGNORECASE)


def _avenue_mask_files(path: str) -> dict[str, str]:
  """``{video: file}`` of anomalib's Avenue ``<n>_label.mat`` files in ``path``,
  ``path/testing_label_mask`` or ``path/ground_truth_demo/testing_label_mask``."""
  for base in (
    path,
    os.path.join(path, "testing_label_mask"),
    os.path.join(path, "ground_truth_demo", "testing_label_mask"),
  ):
    if not os.path.isdir(base):
      continue
    with os.scandir(base) as entries:
      found = {
        m.group(1): e.path for e in entries if e.is_file() and (m := _AVENUE_MAT.match(e.name))
      }
    if found:
      return found
  return {}


def _match_videos(videos: Sequence[str], found: dict[str, str], path: str, what: str):
  """Maps every video to its label item: same name, else the same number in the name.

  Raises:
    ValueError: when a video has no item, or its number matches several.
  """
  by_number = collections.defaultdict(list)
  for key in found:
    by_number[_name_number(key)].append(key)
  out = {}
  for video in videos:
    if video in found:
      out[video] = found[video]
      continue
    number = _name_number(video)
    keys = by_number.get(number, []) if number is not None else []
    if len(keys) != 1:
      names = ", ".join(sorted(found)[:20]) + (" ..." if len(found) > 20 else "")
      reason = "several items share its number" if keys else "no item has its name or number"
      raise ValueError(
        f"labels {path!r}: video {video!r} has no {what} ({reason}); found {len(found)}: {names}"
      )
    out[video] = found[keys[0]]
  return out


def _ucsd_frame_labels(folder: str) -> np.ndarray:
  """0/1 per mask image of a UCSD ``*_gt`` folder, in frame-number order."""
  from PIL import Image

  labels = []
  for file in list_frames(folder):
    with Image.open(file) as img:
      labels.append(bool(np.any(np.asarray(img) != 0)))
  return np.asarray(labels, np.int32)


def _avenue_frame_labels(file: str) -> np.ndarray:
  """0/1 per mask of an Avenue ``<n>_label.mat`` (``volLabel``: a 1 x T cell of H x W masks)."""
  mat = scipy.io.loadmat(file)
  if "volLabel" not in mat:
    keys = ", ".join(k for k in mat if not k.startswith("__"))
    raise ValueError(f"label file {file!r} has no key 'volLabel' (keys: {keys})")
  masks = np.asarray(mat["volLabel"])
  if masks.dtype == object:
    return np.asarray([bool(np.any(np.asarray(m) != 0)) for m in masks.reshape(-1)], np.int32)
  # A numeric (H, W, T) volume instead of a cell array.
  if masks.ndim != 3:
    raise ValueError(f"{file!r}: 'volLabel' must be a cell array of masks, got {masks.shape}")
  return (np.reshape(masks, (-1, masks.shape[-1])) != 0).any(0).astype(np.int32)


def load_frame_labels(
  path: str | os.PathLike,
  videos: Sequence[str],
  frame_counts: Sequence[int],
  skip_first: int,
) -> np.ndarray:
  """Reads frame labels and trims them to the scored frames (1 = anomalous).

  Accepted layouts, recognised by file type and label count:

  * ``.npy`` with one label per scored frame (DMAD ``frame_labels_*.npy``, already trimmed);
  * ``.npy`` with one label per frame (MNAD, shape ``(1, N)`` or ``(N,)``);
  * a folder with one ``<video>.npy`` per video of per-frame labels (ShanghaiTech
    ``test_frame_mask``) or of ``(T, H, W)`` pixel masks (``test_pixel_mask``, anomalib);
  * anomalib's UCSD layout: the folder holding ``Test001_gt/*.bmp`` (or its parent holding
    ``Test/``), one mask image per frame;
  * anomalib's Avenue layout: the folder holding ``<n>_label.mat`` (``testing_label_mask``, or
    its parent ``ground_truth_demo``), each with ``volLabel``, a cell array of per-frame masks.

  Mask layouts label a frame anomalous when its mask has any nonzero pixel (as anomalib does).
  Mask folders and files are matched to videos by name (``Test001_gt`` -> ``Test001``) or, when
  the names differ, by the number in the name (``Test001_gt`` / ``1_label.mat`` -> ``01``).
  * ``.mat`` with key ``gt``: per video a ``2 x K`` array of 1-indexed inclusive anomalous
    ``[start; end]`` intervals (FramePred ``ped2.mat`` / ``avenue.mat``).

  Args:
    path: the label file or folder.
    videos: video names in source order.
    frame_counts: frames per video.
    skip_first: leading frames of each video that are never scored (``t_length - 1``).

  Returns:
    int32 0/1 array with ``sum(frame_counts) - skip_first * len(videos)`` entries, video-major.

  Raises:
    FileNotFoundError: if the path (or a per-video file) does not exist.
    ValueError: if the labels fit no layout; the message lists the frames per video.
  """
  path = os.fspath(path)
  counts = [int(n) for n in frame_counts]
  scored = sum(counts) - skip_first * len(counts)

  def trim(per_video: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([lab[skip_first:] for lab in per_video]).astype(np.int32)

  if os.path.isdir(path):
    per_video = []
    ucsd, avenue = _ucsd_mask_dirs(path), _avenue_mask_files(path)
    # anomalib's raw layouts: UCSD per-frame mask folders, Avenue per-video volLabel files.
    layout = None
    if ucsd:
      unit = "mask images for video {v!r} in {f!r}"
      layout = (ucsd, "*_gt mask folder", _ucsd_frame_labels, unit)
    elif avenue:
      unit = "masks in 'volLabel' of {f!r} for video {v!r}"
      layout = (avenue, "<n>_label.mat file", _avenue_frame_labels, unit)
    if layout is not None:
      items, kind, read, unit = layout
      found = _match_videos(videos, items, path, kind)
      for video, n in zip(videos, counts, strict=True):
        lab = read(found[video])
        if lab.size != n:
          what = f"{lab.size} {unit.format(f=found[video], v=video)}"
          raise _mismatch(path, what, videos, counts, skip_first)
        per_video.append(lab)
      return trim(per_video)
    for video, n in zip(videos, counts, strict=True):
      file = os.path.join(path, f"{video}.npy")
      if not os.path.isfile(file):
        raise FileNotFoundError(f"per-video label file {file!r} does not exist")
      arr = np.load(file)
      # (T,) frame labels (test_frame_mask) or (T, H, W) pixel masks (test_pixel_mask).
      lab = (np.reshape(arr, (arr.shape[0], -1)) != 0).any(1) if arr.ndim == 3 else arr != 0
      lab = np.asarray(lab).reshape(-1).astype(np.int32)
      if lab.size != n:
        raise _mismatch(file, f"{lab.size} labels for video {video!r}", videos, counts, skip_first)
      per_video.append(lab)
    return trim(per_video)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"label file {path!r} does not exist")

  if path.lower().endswith(".mat"):
    mat = scipy.io.loadmat(path)
    if "gt" not in mat:
      keys = ", ".join(k for k in mat if not k.startswith("__"))
      raise ValueError(f"label file {path!r} has no key 'gt' (keys: {keys})")
    # loadmat returns the cell array as a (1, V) or (V, 1) object array.
    gt = np.asarray(mat["gt"]).reshape(-1)
    if gt.size != len(counts):
      raise _mismatch(path, f"intervals for {gt.size} videos", videos, counts, skip_first)
    per_video = [
      _per_frame_from_intervals(g, n, f"{path} video {v}")
      for g, v, n in zip(gt, videos, counts, strict=True)
    ]
    return trim(per_video)

  labels = (np.load(path).reshape(-1) != 0).astype(np.int32)
  if labels.size == scored:
    return labels
  if labels.size == sum(counts):
    return trim(np.split(labels, np.cumsum(counts)[:-1]))
  raise _mismatch(path, f"{labels.size} labels", videos, counts, skip_first)


class VideoFrameSource:
  """Clips of consecutive frames from one split of a frame dump, read lazily from disk.

  Attributes:
    root: the dataset root.
    split: ``"training"`` or ``"testing"``.
    t_length: frames per clip (the last one is the target).
    skip_first: leading frames of each video that are never a target.
    videos: video folder names in order.
    frame_paths: per video, its frame paths in order.
    frame_counts: int64 ``(V,)`` frames per video.
    video_lengths: int64 ``(V,)`` clips (= scored frames) per video.
    labels: int32 ``(N,)`` label of each clip's target frame (zeros without a label file).
    template_of: int32 ``(V,)`` background-template index of each video (all 0 unless set by
      :func:`video_sources`); records carry it as ``"template_index"``.
    template_frames: per template index, the frame paths its template is estimated from (see
      :func:`template_bank`).
  """

  def __init__(
    self,
    root: str | os.PathLike,
    split: str,
    *,
    image_size: int = 256,
    gray: bool = False,
    t_length: int = 5,
    labels: str | os.PathLike | None = None,
    skip_first: int | None = None,
  ):
    """Lists the videos and frames of one split.

    Args:
      root: the folder holding ``training/`` and ``testing/``.
      split: ``"training"`` or ``"testing"`` (``"train"`` / ``"test"`` are accepted).
      image_size: frames are resized to ``(image_size, image_size)``.
      gray: read frames as luminance and repeat it to 3 channels (Avenue, ShanghaiTech).
      t_length: frames per clip.
      labels: optional label file or folder (see :func:`load_frame_labels`).
      skip_first: leading frames of each video that are not scored; None means
        ``t_length - 1`` (every possible clip). A larger value scores the same frames as a model
        with a longer clip, e.g. ``skip_first=4`` with ``t_length=2``.

    Raises:
      FileNotFoundError: if the root, split or frames folder is missing.
      ValueError: for a bad argument, an empty frames folder, a video too short for one clip, or
        labels that do not match the frames.
    """
    if split not in SPLIT_ALIASES:
      raise ValueError(f"split must be one of {tuple(SPLIT_ALIASES)}, got {split!r}")
    check_image_options(image_size, 1)
    if int(t_length) < 1:
      raise ValueError(f"t_length must be >= 1, got {t_length}")
    self.t_length = int(t_length)
    self.skip_first = self.t_length - 1 if skip_first is None else int(skip_first)
    if self.skip_first < self.t_length - 1:
      raise ValueError(
        f"skip_first ({self.skip_first}) must be >= t_length - 1 ({self.t_length - 1}): a clip "
        "needs t_length - 1 frames before its target"
      )
    self.root = os.fspath(root)
    self.split = SPLIT_ALIASES[split]
    self.gray = bool(gray)
    self._image_size = int(image_size)

    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"dataset root {self.root!r} is not a folder; {_LAYOUT}")
    split_dir = os.path.join(self.root, self.split)
    if not os.path.isdir(split_dir):
      raise FileNotFoundError(f"split folder {split_dir!r} does not exist; {_LAYOUT}")
    frames_dir = os.path.join(split_dir, "frames")
    if not os.path.isdir(frames_dir):
      raise FileNotFoundError(f"frames folder {frames_dir!r} does not exist; {_LAYOUT}")
    videos = _video_dirs(frames_dir)
    if not videos:
      raise ValueError(f"frames folder {frames_dir!r} has no video folders; {_LAYOUT}")

    self.videos: list[str] = videos
    self.frame_paths: list[list[str]] = []
    for video in videos:
      video_dir = os.path.join(frames_dir, video)
      paths = list_frames(video_dir)
      if len(paths) <= self.skip_first:
        raise ValueError(
          f"video folder {video_dir!r} has {len(paths)} frames; at least {self.skip_first + 1} "
          f"are needed for one clip (t_length={self.t_length}, skip_first={self.skip_first})"
        )
      self.frame_paths.append(paths)
    self.frame_counts = np.array([len(p) for p in self.frame_paths], np.int64)
    self.video_lengths = self.frame_counts - self.skip_first
    # Clip i belongs to video clip_video[i] and targets frame clip_frame[i] of that video.
    self.clip_video = np.repeat(np.arange(len(videos)), self.video_lengths).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(self.video_lengths)[:-1]])
    self.clip_frame = (
      np.arange(len(self.clip_video)) - starts[self.clip_video] + self.skip_first
    ).astype(np.int32)

    if labels is None:
      self.labels = np.zeros(len(self.clip_video), np.int32)
    else:
      self.labels = load_frame_labels(labels, videos, self.frame_counts, self.skip_first)
    self.set_templates(np.zeros(len(videos), np.int32))

    # Consecutive clips share t_length - 1 frames; keeping the last two clips' frames means a
    # sequential pass decodes each frame once. The lock makes it safe for grain's threads.
    self._cache: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
    self._cache_size = 2 * self.t_length
    self._lock = threading.Lock()

  def set_templates(
    self, template_of: Sequence[int], template_frames: Sequence[Sequence[str]] | None = None
  ) -> None:
    """Assigns every video a background-template index.

    Args:
      template_of: ``(V,)`` template index of each video.
      template_frames: per template index, the frames to estimate it from; None groups this
        split's frames by ``template_of``.

    Raises:
      ValueError: if ``template_of`` does not have one non-negative entry per video, or a used
        index has no frames.
    """
    template_of = np.asarray(template_of, np.int32)
    if template_of.shape != (len(self.videos),) or (template_of < 0).any():
      raise ValueError(
        f"template_of must hold one index >= 0 per video ({len(self.videos)}), got "
        f"{template_of.tolist()}"
      )
    if template_frames is None:
      template_frames = [[] for _ in range(int(template_of.max()) + 1)]
      for v, t in enumerate(template_of):
        template_frames[t].extend(self.frame_paths[v])
    template_frames = [list(f) for f in template_frames]
    if int(template_of.max()) >= len(template_frames):
      raise ValueError(
        f"template index {int(template_of.max())} has no frames ({len(template_frames)} templates)"
      )
    self.template_of = template_of
    self.template_frames = template_frames

  @property
  def num_templates(self) -> int:
    """Number of background templates the records index into."""
    return len(self.template_frames)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of each record's ``"image"`` (the target frame)."""
    return (self._image_size, self._image_size, 3)

  def __len__(self) -> int:
    """Number of clips in the split."""
    return len(self.clip_video)

  def load_frame(self, video: int, frame: int) -> np.ndarray:
    """One frame as float32 ``(S, S, 3)`` in ``[-1, 1]``, from the cache when possible.

    Args:
      video: video index.
      frame: frame index inside the video.

    Returns:
      The frame (gray sources repeat the luminance to 3 channels).
    """
    key = (video, frame)
    with self._lock:
      cached = self._cache.get(key)
      if cached is not None:
        self._cache.move_to_end(key)
        return cached
    path = self.frame_paths[video][frame]
    image = load_image(path, image_size=self._image_size, channels=1 if self.gray else 3)
    if self.gray:
      image = np.repeat(image, 3, axis=-1)
    image = to_unit_range(image)
    image.setflags(write=False)  # Shared between records through the cache.
    with self._lock:
      self._cache[key] = image
      while len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    return image

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    """Reads clip ``index``.

    Args:
      index: clip position; negative values count from the end.

    Returns:
      The record dict described in the module docstring.

    Raises:
      IndexError: if ``index`` is out of range.
      ImageReadError: if a frame cannot be decoded.
    """
    i = check_index(index, len(self))
    video, target = int(self.clip_video[i]), int(self.clip_frame[i])
    frames = [self.load_frame(video, f) for f in range(target - self.t_length + 1, target + 1)]
    return {
      "frames": np.concatenate(frames, axis=-1),
      "image": frames[-1].copy(),
      "label": np.int32(self.labels[i]),
      "index": np.int32(i),
      "video": np.int32(video),
      "frame": np.int32(target),
      "template_index": np.int32(self.template_of[video]),
    }

  def describe(self) -> str:
    """One line for logs: root, split, clip count, shape and clips per video.

    Returns:
      The summary string.
    """
    groups = [self.videos[v] for v in self.clip_video]
    name = f"video {self.root} {self.split} ({len(self.videos)} videos, t_length={self.t_length})"
    return describe_source(name, self.image_shape, self.labels, groups)


def _hist_kernel() -> np.ndarray:
  """The normalised 13-tap Gaussian (sigma 2.3) that smooths the per-pixel histograms."""
  x = np.arange(HIST_KERNEL_SIZE, dtype=np.float64) - (HIST_KERNEL_SIZE - 1) / 2
  kernel = np.exp(-(x**2) / (2 * HIST_KERNEL_SIGMA**2))
  return kernel / kernel.sum()


def estimate_template(frames_uint8: np.ndarray, *, method: str = "hist_mode") -> np.ndarray:
  """Background template of one video from its gray frames.

  ``"hist_mode"`` is DMAD's ``gen_bkg``: per pixel, the 256-bin histogram of its values over all
  frames is smoothed with a 13-tap Gaussian (sigma 2.3, zero padding beyond 0 and 255) and the
  most frequent value is kept, so passing objects do not blur the background as a mean would.
  ``"median"`` is the per-pixel median.

  Args:
    frames_uint8: uint8 ``(T, H, W)`` gray frames.
    method: ``"hist_mode"`` or ``"median"``.

  Returns:
    float32 ``(H, W)`` template in ``[-1, 1]`` (``value / 127.5 - 1``).

  Raises:
    ValueError: for an unknown method or frames that are not uint8 ``(T, H, W)`` with T >= 1.
  """
  frames = np.asarray(frames_uint8)
  if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[0] == 0:
    raise ValueError(
      f"expected uint8 (T, H, W) frames with T >= 1, got {frames.dtype} {frames.shape}"
    )
  _, h, w = frames.shape
  if method == "median":
    value = np.median(frames, axis=0)
  elif method == "hist_mode":
    pixels = h * w
    offsets = np.arange(pixels, dtype=np.int64) * 256
    hist = np.zeros(pixels * 256, np.int64)
    # One bincount over (pixel, value) pairs builds every pixel's histogram at once; chunks of
    # frames bound the int64 index array on long videos.
    for chunk in range(0, frames.shape[0], 64):
      flat = frames[chunk : chunk + 64].reshape(-1, pixels)
      hist += np.bincount((flat + offsets).reshape(-1), minlength=pixels * 256)
    smooth = scipy.ndimage.convolve1d(
      hist.reshape(pixels, 256).astype(np.float64), _hist_kernel(), axis=1, mode="constant"
    )
    value = np.argmax(smooth, axis=1).reshape(h, w)
  else:
    raise ValueError(f"method must be 'hist_mode' or 'median', got {method!r}")
  return (np.asarray(value, np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def video_templates(
  source: VideoFrameSource, *, method: str = "hist_mode", max_frames: int | None = None
) -> np.ndarray:
  """One background template per video of a source (DMAD's ShanghaiTech per-scene bank).

  Frames are read as luminance at the source's size whatever its ``gray`` setting, and the
  template is repeated to 3 channels like the frames the model sees.

  Args:
    source: a :class:`VideoFrameSource`.
    method: see :func:`estimate_template`.
    max_frames: use at most this many frames per video, evenly spaced over it (all when None).

  Returns:
    float32 ``(num_videos, S, S, 3)`` in ``[-1, 1]``, in the source's video order.

  Raises:
    ValueError: for an unknown method or ``max_frames < 1``.
  """
  if max_frames is not None and int(max_frames) < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}")
  size = source.image_shape[0]
  out = np.empty((len(source.videos), size, size, 3), np.float32)
  for v, paths in enumerate(source.frame_paths):
    if max_frames is not None and len(paths) > int(max_frames):
      picks = np.linspace(0, len(paths) - 1, int(max_frames)).round().astype(int)
      paths = [paths[i] for i in picks]
    frames = np.stack([load_image(p, image_size=size, channels=1)[:, :, 0] for p in paths])
    out[v] = estimate_template(frames, method=method)[:, :, None]
  return out


TEMPLATE_MODES = ("single", "scene", "video_transductive")


def scene_of(video: str) -> str:
  """The scene of a video name: the part before the first ``_`` (ShanghaiTech ``01_0014`` ->
  ``01``); names without ``_`` (Ped2, Avenue) all belong to the scene ``""``."""
  return video.split("_", 1)[0] if "_" in video else ""


def video_sources(
  root: str | os.PathLike,
  *,
  templates: str = "single",
  labels: str | os.PathLike | None = None,
  **kwargs,
) -> dict[str, VideoFrameSource]:
  """The training and test sources of a frame dump, with background-template indices.

  ``templates`` says which background template each video uses (DMAD's ``bkg``):

  * ``"single"``: one template for every video (Ped2, Avenue: a fixed camera).
  * ``"scene"``: one template per scene (:func:`scene_of`), estimated from the TRAINING videos
    of that scene only; every test video must belong to a training scene. The default for
    ShanghaiTech in dmad_jax.
  * ``"video_transductive"``: the official ShanghaiTech code: one template per video, the
    training videos first, then the test videos, whose templates are estimated from the TEST
    frames themselves (transductive: the test set's frames shape the model's input).

  Args:
    root: the folder holding ``training/`` and ``testing/``.
    templates: one of ``TEMPLATE_MODES``.
    labels: the test split's label file or folder (None or "": all frames labelled 0).
    **kwargs: other :class:`VideoFrameSource` arguments (``image_size``, ``gray``, ...).

  Returns:
    ``{"train": source, "test": source}``; both carry the same ``template_frames`` list, so
    ``num_templates`` is the size of the whole template bank.

  Raises:
    ValueError: for an unknown mode, or a test video whose scene has no training video.
  """
  train = VideoFrameSource(root, "training", **kwargs)
  test = VideoFrameSource(root, "testing", labels=labels or None, **kwargs)
  if templates == "single":
    return {"train": train, "test": test}
  if templates == "scene":
    scenes = sorted({scene_of(v) for v in train.videos})
    index = {s: i for i, s in enumerate(scenes)}
    missing = sorted({v for v in test.videos if scene_of(v) not in index})
    if missing:
      raise ValueError(
        f"templates='scene': test videos {missing[:10]} belong to scenes without training "
        f"videos (training scenes: {scenes}) under {os.fspath(root)!r}"
      )
    train.set_templates([index[scene_of(v)] for v in train.videos])
    test.set_templates([index[scene_of(v)] for v in test.videos], train.template_frames)
    return {"train": train, "test": test}
  if templates == "video_transductive":
    frames = [*train.frame_paths, *test.frame_paths]
    n = len(train.videos)
    train.set_templates(np.arange(n), frames)
    test.set_templates(n + np.arange(len(test.videos)), frames)
    return {"train": train, "test": test}
  raise ValueError(f"templates must be one of {TEMPLATE_MODES}, got {templates!r}")


def count_templates(root: str | os.PathLike, templates: str = "single") -> tuple[int, int]:
  """Template-bank size of a frame dump without reading any frame (for configs).

  Args:
    root: the folder holding ``training/frames`` and ``testing/frames``.
    templates: one of ``TEMPLATE_MODES`` (see :func:`video_sources`).

  Returns:
    ``(trained, test_only)``: templates that training updates, and templates only test videos
    use (non-zero for ``"video_transductive"`` only).

  Raises:
    FileNotFoundError: if a frames folder is missing.
    ValueError: for an unknown mode.
  """

  def names(split):
    folder = os.path.join(os.fspath(root), split, "frames")
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"frames folder {folder!r} does not exist; {_LAYOUT}")
    return _video_dirs(folder)

  if templates == "single":
    return 1, 0
  if templates == "scene":
    return len({scene_of(v) for v in names("training")}), 0
  if templates == "video_transductive":
    return len(names("training")), len(names("testing"))
  raise ValueError(f"templates must be one of {TEMPLATE_MODES}, got {templates!r}")


def template_bank(
  source: VideoFrameSource, *, method: str = "hist_mode", max_frames: int | None = None
) -> np.ndarray:
  """Estimates every background template of a source's bank (see :func:`video_sources`).

  Each template is :func:`estimate_template` of the gray frames in
  ``source.template_frames[i]`` (at most ``max_frames`` of them, evenly spaced), repeated to 3
  channels like the frames the model sees.

  Args:
    source: a :class:`VideoFrameSource`.
    method: see :func:`estimate_template`.
    max_frames: frames used per template (all when None).

  Returns:
    float32 ``(num_templates, S, S, 3)`` in ``[-1, 1]``.

  Raises:
    ValueError: for an unknown method or ``max_frames < 1``.
  """
  if max_frames is not None and int(max_frames) < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}")
  size = source.image_shape[0]
  out = np.empty((source.num_templates, size, size, 3), np.float32)
  for t, paths in enumerate(source.template_frames):
    if max_frames is not None and len(paths) > int(max_frames):
      picks = np.linspace(0, len(paths) - 1, int(max_frames)).round().astype(int)
      paths = [paths[i] for i in picks]
    frames = np.stack([load_image(p, image_size=size, channels=1)[:, :, 0] for p in paths])
    out[t] = estimate_template(frames, method=method)[:, :, None]
  return out


def extract_frames(video_path: str | os.PathLike, out_dir: str | os.PathLike, *, ext="jpg") -> int:
  """Dumps every frame of a video file as ``000000.<ext>``, ``000001.<ext>``, ...

  Args:
    video_path: a video file OpenCV can decode (``.avi``, ``.mp4``, ...).
    out_dir: output folder, created if needed (e.g. ``<root>/testing/frames/01``).
    ext: image format of the frames.

  Returns:
    The number of frames written.

  Raises:
    ImportError: if OpenCV is not installed (it is not a dependency of dmad_jax).
    FileNotFoundError: if the video is missing.
    ValueError: if OpenCV cannot open the video or it has no frames.
  """
  try:
    import cv2
  except ImportError as err:
    raise ImportError(
      "extract_frames needs OpenCV, which dmad_jax does not install: "
      "pip install opencv-python-headless"
    ) from err
  video_path, out_dir = os.fspath(video_path), os.fspath(out_dir)
  if not os.path.isfile(video_path):
    raise FileNotFoundError(f"video file {video_path!r} does not exist")
  capture = cv2.VideoCapture(video_path)
  if not capture.isOpened():
    raise ValueError(f"OpenCV cannot open video {video_path!r}")
  os.makedirs(out_dir, exist_ok=True)
  count = 0
  try:
    while True:
      ok, frame = capture.read()
      if not ok:
        break
      out = os.path.join(out_dir, f"{count:06d}.{ext}")
      if not cv2.imwrite(out, frame):
        raise ValueError(f"OpenCV could not write frame {out!r}")
      count += 1
  finally:
    capture.release()
  if count == 0:
    raise ValueError(f"no frames decoded from {video_path!r}")
  return count


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: ``python -m dmad_jax.data.video extract IN.avi OUTDIR [--ext png]``.

  Args:
    argv: arguments without the program name (``sys.argv[1:]`` when None).
  """
  parser = argparse.ArgumentParser(prog="python -m dmad_jax.data.video")
  commands = parser.add_subparsers(dest="command", required=True)
  extract = commands.add_parser("extract", help="dump a video file's frames as numbered images")
  extract.add_argument("video", help="input video file")
  extract.add_argument("out_dir", help="output frames folder, e.g. <root>/testing/frames/01")
  extract.add_argument("--ext", default="jpg", help="image format of the frames (default jpg)")
  args = parser.parse_args(argv)
  count = extract_frames(args.video, args.out_dir, ext=args.ext)
  print(f"wrote {count} frames to {args.out_dir}")


if __name__ == "__main__":
  main()
