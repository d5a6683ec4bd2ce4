"""Random-access source over DAGM 2007 (Wieler & Hahn's weakly supervised optical inspection set).

On-disk layout of the public release (ten texture classes, 512x512 8-bit gray PNGs)::

  <root>/Class<k>/Train/<image>.PNG                   k = 1..10
  <root>/Class<k>/Train/Label/Labels.txt             which images are defective
  <root>/Class<k>/Train/Label/<stem>_label.PNG       defect mask (0 / 255 ellipse), defective only
  <root>/Class<k>/Test/...                            the same

``Labels.txt`` starts with a header line (a single number), then one line per image of
whitespace-separated fields ``<id> <flag> <image file> 0 <mask file or 0>``: flag 0 is a
non-defective image, flag 1 a defective one whose mask file (in the ``Label`` folder) is named.

Protocol, as reverse-distillation papers use DAGM for unsupervised anomaly detection:

* ``train``: the non-defective (flag 0) images of ``Train/``; the defective ones are left out (the
  number is logged).
* ``test``: every image of ``Test/``, label = flag, with its mask (zeros for normal images).

Records are served exactly like :class:`dmad_jax.data.folder.FolderSource`'s (this source shares
its :class:`~dmad_jax.data.folder.ImageListSource` part): ``{"image": float32 (H, W, C) in
[-1, 1], "label": int32, "index": int32}``, and on the test split ``"mask"``: float32 ``(H, W)``
in {0, 1}, binarised, resized bilinearly and thresholded at 0.5 like MVTec masks. Images are gray;
``channels=3`` repeats them for ImageNet backbones. The images listed in ``Labels.txt`` define a
split, in file-name order (record ``i`` is the same file everywhere); image files of the folder
that are not listed are left out with a logged warning. There is no validation split.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os

from dmad_jax.data.base import describe_source
from dmad_jax.data.folder import GOOD, ImageListSource
from dmad_jax.data.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

CLASS_IDS = tuple(range(1, 11))
SPLIT_FOLDERS = {"train": "Train", "test": "Test"}
SPLITS = tuple(SPLIT_FOLDERS)
LABEL_DIR = "Label"
LABELS_FILE = "Labels.txt"
DEFECT = "defect"
_NO_MASK = "0"
_FIELDS = 5

_LAYOUT = (
  "expected the DAGM 2007 layout:\n"
  "  <root>/Class<k>/Train/<images>.PNG   (k = 1..10)\n"
  "  <root>/Class<k>/Train/Label/Labels.txt   (a header line, then one line per image: "
  "<id> <flag 0|1> <image file> 0 <mask file or 0>)\n"
  "  <root>/Class<k>/Train/Label/<image stem>_label.PNG   (masks of the defective images)\n"
  "  <root>/Class<k>/Test/...   (the same)"
)


@dataclasses.dataclass(frozen=True)
class LabelEntry:
  """One image line of a ``Labels.txt``.

  Attributes:
    line: 1-based line number in the file.
    image: image file name (in the split folder).
    defective: flag 1.
    mask: mask file name (in the ``Label`` folder) of a defective image; None otherwise.
  """

  line: int
  image: str
  defective: bool
  mask: str | None


def read_labels(path: str | os.PathLike) -> list[LabelEntry]:
  """Parses a DAGM 2007 ``Labels.txt``.

  The first non-empty line is the header (one field, a number) and is skipped; every other
  non-empty line is split on whitespace into ``<id> <flag> <image file> <0> <mask file or 0>``.
  A UTF-8 byte-order mark and Windows line ends are accepted. A non-defective line that names a
  mask is kept with its mask ignored (logged).

  Args:
    path: the ``Labels.txt`` file.

  Returns:
    One entry per image line, in file order.

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: naming the file and line number, for a header of more than one field, a line
      without 5 fields, a flag other than 0 or 1, a defective image without a mask file name, or
      an image listed twice; or for a file that is not UTF-8 text.
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8-sig") as f:
      text = f.read()
  except UnicodeDecodeError as err:
    raise ValueError(f"{path!r} is not a text file: {err}") from err

  def bad(line_no: int, what: str) -> ValueError:
    return ValueError(f"{path!r} line {line_no}: {what}")

  entries: list[LabelEntry] = []
  first_line: dict[str, int] = {}
  masked_normals: list[int] = []
  header = True
  for line_no, line in enumerate(text.splitlines(), start=1):
    fields = line.split()
    if not fields:
      continue
    if header:
      header = False
      if len(fields) != 1:
        raise bad(
          line_no,
          f"expected the header line (a single number), got {len(fields)} fields {line.strip()!r};"
          f" a DAGM 2007 {LABELS_FILE} starts with one",
        )
      continue
    if len(fields) != _FIELDS:
      raise bad(
        line_no,
        f"expected {_FIELDS} fields '<id> <flag 0|1> <image file> 0 <mask file or 0>', got "
        f"{len(fields)}: {line.strip()!r}",
      )
    _, flag, image, _, mask = fields
    if flag not in ("0", "1"):
      raise bad(line_no, f"flag must be 0 (non-defective) or 1 (defective), got {flag!r}")
    defective = flag == "1"
    if defective and mask == _NO_MASK:
      raise bad(line_no, f"defective image {image!r} (flag 1) names no mask file (field 5 is 0)")
    if not defective and mask != _NO_MASK:
      masked_normals.append(line_no)
    if image in first_line:
      raise bad(line_no, f"image {image!r} is listed again (first on line {first_line[image]})")
    first_line[image] = line_no
    entries.append(LabelEntry(line_no, image, defective, mask if defective else None))
  if masked_normals:
    logger.warning(
      "%s: %d non-defective images (flag 0) name a mask file, ignored (e.g. line %d)",
      path,
      len(masked_normals),
      masked_normals[0],
    )
  return entries


def _check_class_id(class_id) -> int:
  """``class_id`` as an int in 1..10.

  Raises:
    ValueError: for anything else (bools and non-integers included).
  """
  try:
    if isinstance(class_id, bool):
      raise TypeError
    value = operator.index(class_id)
  except TypeError:
    value = None
  if value not in CLASS_IDS:
    raise ValueError(f"class_id must be a DAGM 2007 class, an int in 1..10, got {class_id!r}")
  return value


def _unlisted_images(folder: str, listed: set[str]) -> list[str]:
  """Sorted names of the image files directly in ``folder`` that ``Labels.txt`` does not list."""
  with os.scandir(folder) as entries:
    return sorted(
      e.name
      for e in entries
      if e.is_file()
      and not e.name.startswith(".")
      and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
      and e.name not in listed
    )


class DAGMSource(ImageListSource):
  """One split (``train`` or ``test``) of one DAGM 2007 class, read lazily from disk.

  Attributes:
    root: the dataset root folder (holding ``Class1`` ... ``Class10``).
    class_id: the class, 1..10.
    split: ``"train"`` or ``"test"``.
    labels_file: the split's ``Labels.txt``.
    paths: path of every record, as ``str``, sorted by file name.
    defects: ``"good"`` (flag 0) or ``"defect"`` (flag 1) per record.
    labels: int32 ``(N,)`` array, the flags.
    mask_paths: test split: the mask of every record (None for normal images); train: None.
  """

  def __init__(
    self,
    root: str | os.PathLike,
    class_id: int,
    split: str,
    *,
    image_size: int,
    channels: int = 3,
    validate: bool | str = True,
  ):
    """Reads the split's ``Labels.txt`` and lists (and optionally checks) its images.

    Args:
      root: the dataset root (holding ``Class<k>/``).
      class_id: the DAGM class, 1..10.
      split: ``"train"`` (non-defective ``Train/`` images) or ``"test"`` (every ``Test/`` image,
        with masks).
      image_size: every image (and mask) is resized to ``(image_size, image_size)``.
      channels: 1 (gray) or 3 (the gray image repeated, e.g. for ImageNet backbones).
      validate: ``True``, ``"skip"`` or ``False``, as for
        :class:`~dmad_jax.data.folder.FolderSource`.

    Raises:
      FileNotFoundError: if ``root``, ``Class<k>``, the split folder or its ``Label/Labels.txt``
        does not exist (showing the expected layout), or an image listed in ``Labels.txt`` does
        not exist (naming it and the line).
      ValueError: for an unknown ``split`` (``"validation"`` included: DAGM has none),
        ``class_id`` or ``validate``, an invalid ``image_size`` or ``channels``, a malformed
        ``Labels.txt`` (see :func:`read_labels`), a split without images, or a defective test
        image whose mask file does not exist (naming the mask path).
      ImageReadError: with ``validate=True``, for the first unreadable image or mask, or a mask
        whose size differs from its image's.
    """
    if split not in SPLITS:
      if split == "validation":
        raise ValueError(
          "DAGM 2007 has no validation split (only Train/ and Test/); use split 'train' or 'test'"
        )
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self.class_id = _check_class_id(class_id)
    self._set_options(image_size, channels, validate)
    self.root = os.fspath(root)
    self.split = split

    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"dataset root {self.root!r} is not a folder; {_LAYOUT}")
    class_dir = os.path.join(self.root, f"Class{self.class_id}")
    if not os.path.isdir(class_dir):
      raise FileNotFoundError(f"DAGM class folder {class_dir!r} does not exist; {_LAYOUT}")
    split_dir = os.path.join(class_dir, SPLIT_FOLDERS[split])
    if not os.path.isdir(split_dir):
      raise FileNotFoundError(f"split folder {split_dir!r} does not exist; {_LAYOUT}")
    label_dir = os.path.join(split_dir, LABEL_DIR)
    self.labels_file = os.path.join(label_dir, LABELS_FILE)
    if not os.path.isfile(self.labels_file):
      raise FileNotFoundError(f"label file {self.labels_file!r} does not exist; {_LAYOUT}")

    entries = read_labels(self.labels_file)
    unlisted = _unlisted_images(split_dir, {e.image for e in entries})
    if unlisted:
      logger.warning(
        "ignoring %d images in %s that %s does not list, e.g. %s",
        len(unlisted),
        split_dir,
        self.labels_file,
        unlisted[0],
      )
    if split == "train":
      left_out = sum(e.defective for e in entries)
      if left_out:
        # Training is unsupervised on normal images only.
        logger.info(
          "leaving out the %d defective training images of %s (of %d listed)",
          left_out,
          split_dir,
          len(entries),
        )
      entries = [e for e in entries if not e.defective]
    if not entries:
      what = "non-defective images (flag 0) to train on" if split == "train" else "images"
      raise ValueError(f"{self.labels_file!r} lists no {what}")
    entries = sorted(entries, key=lambda e: e.image)

    paths = [os.path.join(split_dir, e.image) for e in entries]
    missing = [(p, e.line) for p, e in zip(paths, entries, strict=True) if not os.path.isfile(p)]
    if missing:
      more = f" ({len(missing) - 1} more listed images are missing)" if len(missing) > 1 else ""
      raise FileNotFoundError(
        f"image {missing[0][0]!r} listed in {self.labels_file!r} line {missing[0][1]} does not "
        f"exist{more}"
      )
    defects = [DEFECT if e.defective else GOOD for e in entries]

    mask_paths = None
    if split == "test":
      mask_paths = [os.path.join(label_dir, e.mask) if e.defective else None for e in entries]
      absent = [
        (p, m, e.line)
        for p, m, e in zip(paths, mask_paths, entries, strict=True)
        if m is not None and not os.path.isfile(m)
      ]
      if absent:
        image, mask, line = absent[0]
        more = f" ({len(absent) - 1} more images without masks)" if len(absent) > 1 else ""
        raise ValueError(
          f"defective test image {image!r} has no ground-truth mask: expected {mask!r} (named in "
          f"{self.labels_file!r} line {line}){more}"
        )
      if GOOD not in defects or DEFECT not in defects:
        logger.warning(
          "test split %s has %s; image-level AUROC needs both normal and anomalous images",
          split_dir,
          "no non-defective images" if GOOD not in defects else "no defective images",
        )

    self._set_records(paths, defects, mask_paths, validate=validate, where=split_dir)

  def describe(self) -> str:
    """One line for logs: root, class, split, size, shape and normal / defective counts.

    Returns:
      The summary string, e.g. ``"dagm /data/DAGM Class3 test: 1150 images ..."``.
    """
    line = describe_source(
      f"dagm {self.root} Class{self.class_id} {self.split}",
      self.image_shape,
      self.labels,
      self.defects,
    )
    if self.mask_paths is not None:
      line += f"; masks from {os.path.dirname(self.labels_file)}"
    return line
