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

Test-split labels are read by :func:`dmad_jax.data.labels.load_frame_labels` (DMAD's trimmed
``.npy``, MNAD's untrimmed ``.npy``, ShanghaiTech's per-video ``.npy``, a FramePred ``.mat`` or
anomalib's raw UCSD / Avenue layouts). :func:`video_sources` builds both splits and gives every
video a background-template index (one template, one per scene, or one per video);
:mod:`dmad_jax.data.templates` builds DMAD's background templates, and :func:`extract_frames`
dumps the frames of a video file (needs ``opencv-python-headless``).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence

import numpy as np

from dmad_jax.data.base import check_index, describe_source, record_spec
from dmad_jax.data.images import RESIZE_METHODS, check_image_options, load_image, to_unit_range
from dmad_jax.data.labels import list_frames, load_frame_labels

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


def _video_dirs(frames_dir: str) -> list[str]:
  """Sorted video folder names of a frames folder; hidden folders and UCSD's ``*_gt`` mask
  folders (so that ``UCSDped2/Test`` itself can serve as ``testing/frames``) are skipped."""
  with os.scandir(frames_dir) as entries:
    return sorted(
      e.name
      for e in entries
      if e.is_dir() and not e.name.startswith(".") and not e.name.endswith("_gt")
    )


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
      :func:`dmad_jax.data.templates.template_bank`).
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
    resize: str = "cv2_bilinear",
  ):
    """Lists the videos and frames of one split.

    Args:
      root: the folder holding ``training/`` and ``testing/``.
      split: ``"training"`` or ``"testing"`` (``"train"`` / ``"test"`` are accepted).
      image_size: frames are resized to ``(image_size, image_size)``.
      resize: how: "cv2_bilinear" (the default: OpenCV's bilinear, as the released MNAD and
        DMAD-PDM code reads frames, no antialiasing) or "pil_bilinear" (PIL's, antialiased,
        the image sources'); see :func:`dmad_jax.data.images.resize_bilinear_cv2`.
      gray: read frames as luminance and repeat it to 3 channels (Avenue, ShanghaiTech).
      t_length: frames per clip.
      labels: optional label file or folder (see :func:`dmad_jax.data.labels.load_frame_labels`).
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
    if resize not in RESIZE_METHODS:
      raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {resize!r}")
    self._resize = resize

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

  @property
  def element_spec(self) -> dict:
    """Shape and dtype of every entry of a record (nothing is read)."""
    return clip_spec(self._image_size, self.t_length)

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
    image = load_image(
      path, image_size=self._image_size, channels=1 if self.gray else 3, resize=self._resize
    )
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


TEMPLATE_MODES = ("single", "scene", "video_transductive")


def scene_of(video: str) -> str:
  """The scene of a video name: the part before the first ``_`` (ShanghaiTech ``01_0014`` ->
  ``01``); names without ``_`` (Ped2, Avenue) all belong to the scene ``""``."""
  return video.split("_", 1)[0] if "_" in video else ""


def clip_spec(image_size: int, t_length: int) -> dict:
  """The ``element_spec`` of a :class:`VideoFrameSource`'s records: ``frames`` (S, S, 3 t),
  ``image`` (the target frame) and the int32 scalars ``label``, ``index``, ``video``, ``frame``
  and ``template_index``."""
  size = int(image_size)
  scalar = ((), np.int32)
  return record_spec(
    (size, size, 3),
    frames=((size, size, 3 * int(t_length)), np.float32),
    video=scalar,
    frame=scalar,
    template_index=scalar,
  )


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
