"""Frame labels of a video frame dump's test split (1 = anomalous), trimmed to the scored frames.

:func:`load_frame_labels` reads DMAD's trimmed ``.npy``, MNAD's untrimmed ``.npy``, a folder of
per-video ``<video>.npy`` (ShanghaiTech ``test_frame_mask`` / ``test_pixel_mask``), a FramePred
``.mat`` (key ``gt``) or anomalib's raw layouts (UCSD ``Test*_gt/*.bmp`` masks, Avenue
``testing_label_mask/<n>_label.mat`` with ``volLabel``), recognised by file type and label count.
Mask layouts label a frame anomalous when its mask has any nonzero pixel (as anomalib does). The
result is video-major, in the video order of :class:`dmad_jax.data.video.VideoFrameSource`, with
the first ``skip_first`` frames of each video dropped.

:func:`list_frames` orders the image files of a folder (a video's frames, UCSD's mask images) by
the integer in their file stem, so ``2.jpg`` precedes ``10.jpg``.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Sequence

import numpy as np
import scipy.io

from dmad_jax.data.images import IMAGE_EXTENSIONS


def _frame_number(path: str) -> int:
  """The integer in a frame file's stem (the last run of digits, so ``img_0012`` -> 12)."""
  digits = re.findall(r"\d+", os.path.splitext(os.path.basename(path))[0])
  if not digits:
    raise ValueError(f"frame file {path!r} has no frame number in its name")
  return int(digits[-1])


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
