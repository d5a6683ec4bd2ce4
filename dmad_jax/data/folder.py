"""Random-access source over an MVTec-style image folder (the layout users put their data in).

Expected layout::

  <root>/train/good/*.png          normal training images
  <root>/test/good/*.png           normal test images      (label 0)
  <root>/test/<defect>/*.png       anomalous test images   (label 1, one folder per defect type)

Files are listed in sorted order (folders by name, then files by name), so record ``i`` is the
same file on every machine and every run. Hidden files (``.DS_Store``, ...) are skipped silently;
files with other extensions are skipped with a logged warning.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dmad_jax.data.base import ANOMALOUS, NORMAL, check_index, describe_source, make_record
from dmad_jax.data.images import (
  IMAGE_EXTENSIONS,
  ImageReadError,
  check_image_options,
  load_image,
  verify_image,
)

logger = logging.getLogger(__name__)

GOOD = "good"
SPLITS = ("train", "test")

_LAYOUT = (
  "expected layout:\n"
  "  <root>/train/good/<images>\n"
  "  <root>/test/good/<images>\n"
  "  <root>/test/<defect_name>/<images>   (one folder per defect type)"
)

# Validation is I/O plus PIL decoding, which releases the GIL, so a few threads cut the start-up
# time on folders of large images without oversubscribing small machines.
_VALIDATE_THREADS = min(8, os.cpu_count() or 1)


def _subdirs(folder: str) -> list[str]:
  """Sorted names of the non-hidden sub-folders of ``folder``."""
  with os.scandir(folder) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _list_images(folder: str) -> list[str]:
  """Sorted image paths directly inside ``folder``.

  Args:
    folder: a class folder such as ``<root>/test/crack``.

  Returns:
    The paths of files whose extension is in ``IMAGE_EXTENSIONS`` (case-insensitive).

  Raises:
    ValueError: if the folder holds no such file.
  """
  images, ignored = [], []
  with os.scandir(folder) as entries:
    for entry in entries:
      if entry.name.startswith("."):
        continue  # .DS_Store, editor swap files, ...: never data, not worth a warning.
      if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
        images.append(entry.path)
      else:
        ignored.append(entry.name + ("/" if entry.is_dir() else ""))
  if ignored:
    logger.warning(
      "ignoring %d entries in %s that are not images with extensions %s: %s",
      len(ignored),
      folder,
      ", ".join(IMAGE_EXTENSIONS),
      ", ".join(sorted(ignored)),
    )
  if not images:
    raise ValueError(
      f"image folder {folder!r} is empty: no files with extensions "
      f"{', '.join(IMAGE_EXTENSIONS)} (case-insensitive)"
      + (f"; ignored: {', '.join(sorted(ignored))}" if ignored else "")
    )
  return sorted(images)


class FolderSource:
  """One split (``train`` or ``test``) of an MVTec-style folder, read lazily from disk.

  Attributes:
    root: the dataset root folder.
    split: ``"train"`` or ``"test"``.
    paths: path of every record, as ``str``.
    defects: class folder of every record (``"good"`` or the defect name).
    labels: int32 ``(N,)`` array, 0 for ``good`` and 1 otherwise.
  """

  def __init__(
    self,
    root: str | os.PathLike,
    split: str,
    *,
    image_size: int,
    channels: int = 3,
    validate: bool | str = True,
  ):
    """Lists (and optionally checks) the images of one split.

    Args:
      root: the dataset root (the folder holding ``train/`` and ``test/``).
      split: ``"train"`` (only ``train/good``) or ``"test"`` (every folder of ``test/``).
      image_size: every image is resized to ``(image_size, image_size)``.
      channels: 1 (gray) or 3 (RGB).
      validate: ``True`` decodes every file once now, so that a corrupt file fails before
        training; ``"skip"`` decodes every file and drops unreadable ones with a logged warning;
        ``False`` checks nothing (a bad file raises when it is read).

    Raises:
      FileNotFoundError: if ``root`` or its split folder does not exist.
      ValueError: for an unknown ``split`` or ``validate``, an invalid ``image_size`` or
        ``channels``, or a class folder without images.
      ImageReadError: with ``validate=True``, for the first unreadable file.
    """
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if validate not in (True, False, "skip"):
      raise ValueError(f"validate must be True, False or 'skip', got {validate!r}")
    check_image_options(image_size, channels)
    self.root = os.fspath(root)
    self.split = split
    self._image_size = int(image_size)
    self._channels = int(channels)

    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"dataset root {self.root!r} is not a folder; {_LAYOUT}")
    split_dir = os.path.join(self.root, split)
    if not os.path.isdir(split_dir):
      raise FileNotFoundError(f"split folder {split_dir!r} does not exist; {_LAYOUT}")

    classes = _subdirs(split_dir)
    if split == "train":
      if GOOD not in classes:
        raise FileNotFoundError(
          f"training folder {os.path.join(split_dir, GOOD)!r} does not exist; {_LAYOUT}"
        )
      if len(classes) > 1:
        # Training is unsupervised on normal images only; anything else is left out on purpose.
        logger.warning(
          "only %s is used for training; ignoring folders %s",
          os.path.join(split_dir, GOOD),
          ", ".join(c for c in classes if c != GOOD),
        )
      classes = [GOOD]
    elif not classes:
      raise ValueError(f"test folder {split_dir!r} has no class folders; {_LAYOUT}")
    else:
      with os.scandir(split_dir) as entries:
        loose = sorted(e.name for e in entries if e.is_file() and not e.name.startswith("."))
      if loose:
        logger.warning(
          "ignoring %d files directly in %s (images must sit in a class folder): %s",
          len(loose),
          split_dir,
          ", ".join(loose),
        )
      if GOOD not in classes or classes == [GOOD]:
        logger.warning(
          "test folder %s has %s; image-level AUROC needs both normal and anomalous images",
          split_dir,
          "no 'good' folder" if GOOD not in classes else "no defect folders",
        )

    paths, defects = [], []
    for name in classes:
      files = _list_images(os.path.join(split_dir, name))
      paths.extend(files)
      defects.extend([name] * len(files))

    if validate:
      paths, defects = self._validate(paths, defects, skip=validate == "skip")
      if not paths:
        raise ValueError(f"no readable images left in {split_dir!r} after skipping bad files")

    self.paths: list[str] = paths
    self.defects: list[str] = defects
    self.labels = np.array([NORMAL if d == GOOD else ANOMALOUS for d in defects], np.int32)

  def _validate(
    self, paths: list[str], defects: list[str], *, skip: bool
  ) -> tuple[list[str], list[str]]:
    """Decodes every file once; raises for (or, with ``skip``, drops) the unreadable ones."""

    def check(path: str) -> ImageReadError | None:
      try:
        verify_image(path, image_size=self._image_size, channels=self._channels)
      except ImageReadError as err:
        return err
      return None

    with ThreadPoolExecutor(_VALIDATE_THREADS) as pool:
      errors = list(pool.map(check, paths))
    bad = [err for err in errors if err is not None]
    if not bad:
      return paths, defects
    if not skip:
      first = bad[0]
      reason = first.reason
      if len(bad) > 1:
        # Naming every bad file at once saves one fix-and-rerun cycle per file.
        reason += f" ({len(bad) - 1} more unreadable: {', '.join(e.path for e in bad[1:])})"
      raise ImageReadError(first.path, reason) from first
    for err in bad:
      logger.warning("skipping unreadable image %s (%s)", err.path, err.reason)
    keep = [i for i, err in enumerate(errors) if err is None]
    return [paths[i] for i in keep], [defects[i] for i in keep]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of every record's image."""
    return (self._image_size, self._image_size, self._channels)

  def __len__(self) -> int:
    """Number of images in the split."""
    return len(self.paths)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    """Reads record ``index`` from disk.

    Args:
      index: record position; negative values count from the end.

    Returns:
      ``{"image": float32 (H, W, C) in [-1, 1], "label": int32, "index": int32}``.

    Raises:
      IndexError: if ``index`` is out of range.
      ImageReadError: if the file cannot be decoded (only possible with ``validate=False`` or
        when the file changed after construction).
    """
    i = check_index(index, len(self))
    image = load_image(self.paths[i], image_size=self._image_size, channels=self._channels)
    return make_record(image, int(self.labels[i]), i)

  def describe(self) -> str:
    """One line for logs: root, split, size, shape and per-folder counts.

    Returns:
      The summary string.
    """
    return describe_source(
      f"folder {self.root} {self.split}", self.image_shape, self.labels, self.defects
    )
