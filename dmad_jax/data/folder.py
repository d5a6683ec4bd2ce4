"""Random-access source over an MVTec-style image folder (the layout users put their data in).

Expected layout::

  <root>/train/good/*.png          normal training images
  <root>/test/good/*.png           normal test images      (label 0)
  <root>/test/<defect>/*.png       anomalous test images   (label 1, one folder per defect type)
  <root>/ground_truth/<defect>/<stem>_mask.png   optional pixel masks of the anomalous test images
  <root>/validation/good/*.png     optional held-out normal images (and validation/<defect>/*),
                                   read only to calibrate a threshold (evaluation.calibration)

Without ``validation/``, ``validation_fraction > 0`` makes the validation split a seeded share of
``train/good`` that training never sees (:func:`dmad_jax.data.base.holdout_indices`): normal images
the model did not fit, so that a threshold fitted on them holds on new normal images.

Files are listed in sorted order (folders by name, then files by name), so record ``i`` is the
same file on every machine and every run. Hidden files (``.DS_Store``, ...) are skipped silently;
files with other extensions are skipped with a logged warning.

Ground-truth masks (MVTec AD layout): when ``<root>/ground_truth`` exists, the test split pairs
every anomalous image ``test/<defect>/<stem>.<ext>`` with the mask
``ground_truth/<defect>/<stem>_mask.<ext>`` by file stem (any image extension, ``.png`` in MVTec
AD). A missing mask, or a mask without its image, is an error naming both paths; normal
(``good``) images get all-zero masks. Masks are binarised (any non-zero pixel is anomalous),
resized bilinearly to the image size like the images and thresholded at 0.5, which equals
DMAD-PPDM / RD4AD's ``Resize`` then ``> 0.5`` on 0/255 masks.

Records are ``{"image", "label", "index"}``; test records of a folder with masks also carry
``"mask"``: float32 ``(H, W)`` in {0, 1}. The key is present on every record of such a test split
and never on training records (training is unsupervised and masks do not exist for ``train/``),
so the records of one split always share the same keys.

Everything after the listing (validation, records, masks) is :class:`ImageListSource`, which other
on-disk layouts share, e.g. DAGM 2007 (:mod:`dmad_jax.data.dagm`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from dmad_jax.data.base import (
  ANOMALOUS,
  NORMAL,
  check_index,
  describe_source,
  holdout_indices,
  make_record,
  record_spec,
)
from dmad_jax.data.images import (
  IMAGE_EXTENSIONS,
  ImageReadError,
  check_image_options,
  load_image,
  verify_image,
)

logger = logging.getLogger(__name__)

GOOD = "good"
SPLITS = ("train", "validation", "test")
GROUND_TRUTH = "ground_truth"
MASK_SUFFIX = "_mask"

_LAYOUT = (
  "expected layout:\n"
  "  <root>/train/good/<images>\n"
  "  <root>/test/good/<images>\n"
  "  <root>/test/<defect_name>/<images>   (one folder per defect type)\n"
  "  <root>/ground_truth/<defect_name>/<image stem>_mask.png   (optional pixel masks)"
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


def _note_sizes(paths: list[str], image_size: int, folder: str) -> None:
  """Logs how the images' sizes compare with ``image_size`` (headers only, no decoding).

  Mixed sizes are a warning naming the most common sizes and one file of a rarer size; one
  size other than ``image_size`` is a note. Either way every image is resized bilinearly to
  ``image_size x image_size`` (the aspect ratio is not kept).
  """

  def size(path: str) -> tuple[int, int] | None:
    try:
      with Image.open(path) as img:
        return img.size
    except Exception:  # Unreadable files were reported (or skipped) by the validation pass.
      return None

  with ThreadPoolExecutor(_VALIDATE_THREADS) as pool:
    sizes = list(pool.map(size, paths))
  counts: dict[tuple[int, int], int] = {}
  for wh in sizes:
    if wh is not None:
      counts[wh] = counts.get(wh, 0) + 1
  if not counts:
    return
  common = sorted(counts, key=lambda wh: (-counts[wh], wh))
  target = f"{image_size}x{image_size}"
  if len(common) > 1:
    example = next(p for p, wh in zip(paths, sizes, strict=True) if wh == common[-1])
    listed = ", ".join(f"{w}x{h}: {counts[(w, h)]}" for w, h in common[:3])
    logger.warning(
      "images in %s come in %d sizes (%s%s); e.g. %s is %dx%d. All are resized to %s "
      "(bilinear, aspect ratio not kept).",
      folder,
      len(common),
      listed,
      ", ..." if len(common) > 3 else "",
      example,
      *common[-1],
      target,
    )
  elif common[0] != (image_size, image_size):
    logger.info("images in %s are %dx%d; resized to %s", folder, *common[0], target)


def _stem(path: str) -> str:
  """File name without folder and extension."""
  return os.path.splitext(os.path.basename(path))[0]


def _match_masks(gt_dir: str, split_dir: str, paths: list[str], defects: list[str]) -> list:
  """Pairs every anomalous test image with ``<gt_dir>/<defect>/<stem>_mask.<ext>``.

  Args:
    gt_dir: the ``<root>/ground_truth`` folder.
    split_dir: the ``<root>/test`` folder.
    paths: test image paths.
    defects: class folder of every path.

  Returns:
    One mask path per image, ``None`` for ``good`` images.

  Raises:
    ValueError: for an anomalous image without a mask, a mask without an image (both named), a
      mask folder without a test folder, or two masks for one image.
  """
  test_classes = set(defects)
  masks: dict[str, dict[str, str]] = {}
  for defect in _subdirs(gt_dir):
    folder = os.path.join(gt_dir, defect)
    if defect == GOOD:
      logger.warning("ignoring %s: normal images get all-zero masks", folder)
      continue
    if defect not in test_classes:
      raise ValueError(
        f"mask folder {folder!r} has no test folder {os.path.join(split_dir, defect)!r}; {_LAYOUT}"
      )
    by_stem: dict[str, str] = {}
    for path in _list_images(folder):
      stem = _stem(path)
      if stem in by_stem:
        raise ValueError(f"two masks for one image: {by_stem[stem]!r} and {path!r}")
      by_stem[stem] = path
    masks[defect] = by_stem

  mask_paths, missing = [], []
  image_stems: dict[str, set[str]] = {}
  for path, defect in zip(paths, defects, strict=True):
    if defect == GOOD:
      mask_paths.append(None)
      continue
    stem = _stem(path)
    image_stems.setdefault(defect, set()).add(stem)
    mask = masks.get(defect, {}).get(stem + MASK_SUFFIX)
    if mask is None:
      missing.append((path, os.path.join(gt_dir, defect, stem + MASK_SUFFIX + ".png")))
    mask_paths.append(mask)
  if missing:
    more = f" ({len(missing) - 1} more images without masks)" if len(missing) > 1 else ""
    raise ValueError(
      f"anomalous test image {missing[0][0]!r} has no ground-truth mask: expected "
      f"{missing[0][1]!r}{more}; with a {GROUND_TRUTH!r} folder every anomalous test image needs "
      f"its mask"
    )
  for defect, by_stem in masks.items():
    for stem, path in sorted(by_stem.items()):
      image_stem = stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else None
      if image_stem is None or image_stem not in image_stems.get(defect, ()):
        expected = os.path.join(split_dir, defect, (image_stem or stem) + ".<png|jpg|...>")
        hint = "" if image_stem else f" (mask names must be <image stem>{MASK_SUFFIX}.<ext>)"
        raise ValueError(f"mask {path!r} has no test image: expected {expected!r}{hint}")
  return mask_paths


def load_mask(path: str | os.PathLike, *, image_size: int) -> np.ndarray:
  """Reads a ground-truth mask as float32 ``(image_size, image_size)`` in {0, 1}.

  Any non-zero pixel is anomalous (16-bit and palette masks included); the binary mask is scaled
  to 0/255, resized with PIL's bilinear filter when the size differs and thresholded at 0.5
  (``>= 128``), as DMAD-PPDM's ``Resize`` + ``ToTensor`` + ``> 0.5`` does for 0/255 masks.

  Args:
    path: mask image file.
    image_size: output height and width.

  Returns:
    float32 array of 0.0 / 1.0.

  Raises:
    ImageReadError: if the file is missing or not a readable image.
  """
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img)
      else:
        values = np.asarray(img.convert("L"))
  except Exception as err:  # PIL raises many types for bad files; see load_image.
    raise ImageReadError(path, f"{type(err).__name__}: {err}") from err
  binary = Image.fromarray(np.where(values > 0, 255, 0).astype(np.uint8), mode="L")
  if binary.size != (image_size, image_size):
    binary = binary.resize((image_size, image_size), Image.Resampling.BILINEAR)
  return (np.asarray(binary) >= 128).astype(np.float32)


def _verify_mask(mask: str, image: str, *, image_size: int) -> None:
  """Checks that ``mask`` decodes and has the pixel size of ``image`` (before any resize).

  Raises:
    ImageReadError: naming the mask, for an unreadable file or a size mismatch.
  """
  try:
    with Image.open(mask) as img:
      img.verify()
    with Image.open(mask) as img, Image.open(image) as ref:
      mask_size, image_size_px = img.size, ref.size
  except Exception as err:  # Same breadth as load_image.
    raise ImageReadError(mask, f"{type(err).__name__}: {err}") from err
  if mask_size != image_size_px:
    raise ImageReadError(
      mask,
      f"mask is {mask_size[0]}x{mask_size[1]} pixels but its image {image!r} is "
      f"{image_size_px[0]}x{image_size_px[1]}",
    )
  load_mask(mask, image_size=image_size)


class ImageListSource:
  """The layout-independent part of the sources over image files on disk, read lazily.

  A subclass finds its files (one folder layout or another), then calls :meth:`_set_options`
  (before listing) and :meth:`_set_records` (with the listing); this class validates the files and
  serves the records, so every such source reads images and masks the same way.

  Attributes:
    paths: path of every record, as ``str``.
    defects: group of every record (``"good"`` for normal images, otherwise the defect name).
    labels: int32 ``(N,)`` array, 0 for ``good`` and 1 otherwise.
    mask_paths: the mask of every record (None for ``good`` images) when the records carry masks;
      otherwise None.
  """

  def _set_options(self, image_size: int, channels: int, validate: bool | str) -> None:
    """Checks and stores the output options shared by every record.

    Raises:
      ValueError: for an unknown ``validate`` or an invalid ``image_size`` or ``channels``.
    """
    if validate not in (True, False, "skip"):
      raise ValueError(f"validate must be True, False or 'skip', got {validate!r}")
    check_image_options(image_size, channels)
    self._image_size = int(image_size)
    self._channels = int(channels)

  def _set_records(
    self,
    paths: list[str],
    defects: list[str],
    mask_paths: list[str | None] | None,
    *,
    validate: bool | str,
    where: str,
  ) -> None:
    """Validates the listed files (per ``validate``, see FolderSource) and stores the records.

    Args:
      paths: image file of every record, in record order.
      defects: group of every record (``"good"`` is normal).
      mask_paths: mask of every record (None for ``good``), or None when records carry no mask.
      validate: ``True``, ``"skip"`` or ``False``, as for :class:`FolderSource`.
      where: the folder named in logs and errors about the split.

    Raises:
      ImageReadError: with ``validate=True``, for the first unreadable file or mask (naming the
        others), or a mask whose size differs from its image's.
      ValueError: with ``validate="skip"``, when no readable image is left.
    """
    if validate:
      paths, defects, mask_paths = self._validate(
        paths, defects, mask_paths, skip=validate == "skip"
      )
      if not paths:
        raise ValueError(f"no readable images left in {where!r} after skipping bad files")
      _note_sizes(paths, self._image_size, where)

    self.paths: list[str] = paths
    self.defects: list[str] = defects
    self.mask_paths: list[str | None] | None = mask_paths
    self.labels = np.array([NORMAL if d == GOOD else ANOMALOUS for d in defects], np.int32)

  def _validate(
    self, paths: list[str], defects: list[str], mask_paths: list | None, *, skip: bool
  ) -> tuple[list[str], list[str], list | None]:
    """Decodes every file (and mask) once; raises for (or, with ``skip``, drops) bad ones."""

    def check(i: int) -> ImageReadError | None:
      try:
        verify_image(paths[i], image_size=self._image_size, channels=self._channels)
        mask = None if mask_paths is None else mask_paths[i]
        if mask is not None:
          _verify_mask(mask, paths[i], image_size=self._image_size)
      except ImageReadError as err:
        return err
      return None

    with ThreadPoolExecutor(_VALIDATE_THREADS) as pool:
      errors = list(pool.map(check, range(len(paths))))
    bad = [err for err in errors if err is not None]
    if not bad:
      return paths, defects, mask_paths
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
    kept_masks = None if mask_paths is None else [mask_paths[i] for i in keep]
    return [paths[i] for i in keep], [defects[i] for i in keep], kept_masks

  @property
  def has_masks(self) -> bool:
    """Whether records carry a ``"mask"`` (e.g. test split of a folder with ``ground_truth/``)."""
    return self.mask_paths is not None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of every record's image."""
    return (self._image_size, self._image_size, self._channels)

  @property
  def element_spec(self) -> dict:
    """Shape and dtype of every entry of a record (nothing is read)."""
    size = self._image_size
    extra = {"mask": ((size, size), np.float32)} if self.has_masks else {}
    return record_spec(self.image_shape, **extra)

  def __len__(self) -> int:
    """Number of images in the split."""
    return len(self.paths)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    """Reads record ``index`` from disk.

    Args:
      index: record position; negative values count from the end.

    Returns:
      ``{"image": float32 (H, W, C) in [-1, 1], "label": int32, "index": int32}``, plus
      ``"mask"``: float32 ``(H, W)`` in {0, 1} (zeros for ``good`` images) when
      :attr:`has_masks`.

    Raises:
      IndexError: if ``index`` is out of range.
      ImageReadError: if the file cannot be decoded (only possible with ``validate=False`` or
        when the file changed after construction).
    """
    i = check_index(index, len(self))
    image = load_image(self.paths[i], image_size=self._image_size, channels=self._channels)
    record = make_record(image, int(self.labels[i]), i)
    if self.mask_paths is not None:
      mask = self.mask_paths[i]
      record["mask"] = (
        np.zeros((self._image_size, self._image_size), np.float32)
        if mask is None
        else load_mask(mask, image_size=self._image_size)
      )
    return record


class FolderSource(ImageListSource):
  """One split (``train`` or ``test``) of an MVTec-style folder, read lazily from disk.

  Attributes:
    root: the dataset root folder.
    split: ``"train"``, ``"validation"`` or ``"test"``.
    paths: path of every record, as ``str``.
    defects: class folder of every record (``"good"`` or the defect name).
    labels: int32 ``(N,)`` array, 0 for ``good`` and 1 otherwise.
    mask_paths: test split of a folder with ``ground_truth/``: the mask of every record (None for
      ``good`` images); otherwise None.
    held_out: whether this train or validation split is a share of ``train/good`` held out by
      ``validation_fraction`` (the folder has no ``validation/``).
  """

  def __init__(
    self,
    root: str | os.PathLike,
    split: str,
    *,
    image_size: int,
    channels: int = 3,
    validate: bool | str = True,
    validation_fraction: float = 0.0,
    seed: int = 0,
  ):
    """Lists (and optionally checks) the images of one split.

    Args:
      root: the dataset root (the folder holding ``train/`` and ``test/``).
      split: ``"train"`` (only ``train/good``), ``"test"`` (every folder of ``test/``) or
        ``"validation"`` (every folder of ``validation/``, labelled as the test split).
      image_size: every image is resized to ``(image_size, image_size)``.
      channels: 1 (gray) or 3 (RGB): gray files are replicated to 3 channels (e.g. for ImageNet
        backbones; MVTec AD grid, screw and zipper are gray), colour files reduced to luma for 1.
      validate: ``True`` decodes every file (and mask) once now, so that a corrupt file fails
        before training; ``"skip"`` decodes every file and drops unreadable ones (and images whose
        mask is unreadable or of another size) with a logged warning; ``False`` checks nothing (a
        bad file raises when it is read). With validation, images of mixed sizes are logged (a
        warning naming the sizes and an example file); all are resized to ``image_size``.
      validation_fraction: when > 0 and the folder has no ``validation/``, this share of
        ``train/good`` (at least one image, chosen by a permutation seeded with ``seed``) is the
        ``validation`` split (normal images only) and is left out of ``train``. With a
        ``validation/`` folder that folder is the split and ``train`` keeps every image.
      seed: the seed of that choice.

    Raises:
      FileNotFoundError: if ``root`` or its split folder does not exist.
      ValueError: for an unknown ``split`` or ``validate``, an invalid ``image_size`` or
        ``channels``, a class folder without images, or unpaired masks (see the module
        docstring).
      ImageReadError: with ``validate=True``, for the first unreadable file or mask, or a mask
        whose size differs from its image's.
    """
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self._set_options(image_size, channels, validate)
    self.root = os.fspath(root)
    self.split = split

    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"dataset root {self.root!r} is not a folder; {_LAYOUT}")
    self._note = ""
    # Held-out validation images: a seeded share of train/good, unless validation/ exists.
    self.held_out = (
      split != "test"
      and bool(validation_fraction)
      and not os.path.isdir(os.path.join(self.root, "validation"))
    )
    listed = "train" if self.held_out else split
    split_dir = os.path.join(self.root, listed)
    if not os.path.isdir(split_dir):
      raise FileNotFoundError(f"split folder {split_dir!r} does not exist; {_LAYOUT}")

    classes = _subdirs(split_dir)
    if listed == "train":
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
      if split == "test" and (GOOD not in classes or classes == [GOOD]):
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
    where = split_dir
    if self.held_out:
      kept, held = holdout_indices(
        len(paths), validation_fraction, seed, what=os.path.join(split_dir, GOOD)
      )
      paths = [paths[i] for i in (held if split == "validation" else kept)]
      defects = [GOOD] * len(paths)
      total = len(kept) + len(held)
      where = f"{os.path.join(split_dir, GOOD)} ({len(held)} of {total} held out for validation)"
      self._note = f"; {len(held)} of the {total} images of train/good held out for validation"

    # Only the test split has masks: train/ holds normal images and MVTec ships no train masks.
    gt_dir = os.path.join(self.root, GROUND_TRUTH)
    mask_paths = None
    if split == "test" and os.path.isdir(gt_dir):
      mask_paths = _match_masks(gt_dir, split_dir, paths, defects)

    self._set_records(paths, defects, mask_paths, validate=validate, where=where)

  def describe(self) -> str:
    """One line for logs: root, split, size, shape and per-folder counts.

    Returns:
      The summary string.
    """
    line = describe_source(
      f"folder {self.root} {self.split}", self.image_shape, self.labels, self.defects
    )
    if self.mask_paths is not None:
      line += f"; masks from {os.path.join(self.root, GROUND_TRUTH)}"
    return line + self._note
