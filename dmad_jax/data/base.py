"""Pieces shared by the random-access sources: the record layout and an in-memory source.

A record is a dict of numpy arrays::

  {"image": float32 (H, W, C) in [-1, 1], "label": int32 (0 normal, 1 anomalous),
   "index": int32 position in the split}
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax
import numpy as np

from dmad_jax.data.images import to_unit_range

NORMAL = 0
ANOMALOUS = 1


def make_record(image: np.ndarray, label: int, index: int) -> dict[str, np.ndarray]:
  """Builds one record from a uint8 image.

  Args:
    image: uint8 ``(H, W, C)`` image.
    label: 0 (normal) or 1 (anomalous).
    index: position of the record in its split.

  Returns:
    The record dict described in the module docstring.
  """
  return {
    "image": to_unit_range(image),
    "label": np.int32(label),
    "index": np.int32(index),
  }


def record_spec(image_shape: Sequence[int], **extra) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of a source's records (``element_spec``), known without reading any:
  ``image`` float32 ``image_shape``, ``label`` and ``index`` int32 scalars, plus ``extra``
  entries given as ``(shape, dtype)``."""
  spec = {
    "image": jax.ShapeDtypeStruct(tuple(int(d) for d in image_shape), np.float32),
    "label": jax.ShapeDtypeStruct((), np.int32),
    "index": jax.ShapeDtypeStruct((), np.int32),
  }
  spec.update({k: jax.ShapeDtypeStruct(tuple(shape), dtype) for k, (shape, dtype) in extra.items()})
  return spec


def check_index(index, length: int) -> int:
  """Normalises a record index the way a Python sequence does.

  Args:
    index: an int-like (Python or NumPy integer); negative values count from the end.
    length: the number of records.

  Returns:
    The index as a non-negative Python int.

  Raises:
    TypeError: if ``index`` is not an integer.
    IndexError: if it is out of range.
  """
  # operator.index rejects floats, which would otherwise silently truncate.
  i = operator.index(index)
  if i < 0:
    i += length
  if not 0 <= i < length:
    raise IndexError(f"record index {index} out of range for a source of {length} records")
  return i


def holdout_indices(n: int, fraction: float, seed: int, *, what: str) -> tuple[np.ndarray, ...]:
  """Splits ``range(n)`` into kept and held-out positions, seeded and independent of anything else.

  ``max(1, round(fraction * n))`` positions are held out, chosen by a permutation of
  ``np.random.default_rng(seed)``; both parts are returned sorted, so records keep the order of
  their listing and only ``seed`` decides membership.

  Args:
    n: number of records.
    fraction: the share to hold out, in (0, 1).
    seed: the permutation's seed.
    what: names the records in errors (e.g. the folder).

  Returns:
    ``(kept, held)``: int64 index arrays, disjoint, together ``range(n)``.

  Raises:
    ValueError: for a fraction outside (0, 1), or when either part would be empty.
  """
  fraction = float(fraction)
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
  held_n = max(1, round(fraction * n))
  if n - held_n < 1:
    raise ValueError(
      f"{what}: {n} image(s) cannot be split into training and validation images "
      f"(validation_fraction {fraction} holds out {held_n}); add images or set "
      "validation_fraction=0"
    )
  perm = np.random.default_rng(int(seed)).permutation(n)
  return np.sort(perm[held_n:]), np.sort(perm[:held_n])


def count_summary(names: Sequence[str]) -> str:
  """Formats ``name: count`` pairs sorted by name, e.g. ``"crack: 2, good: 3"``.

  Args:
    names: one group name per record.

  Returns:
    A comma-separated summary.
  """
  counts: dict[str, int] = {}
  for name in names:
    counts[name] = counts.get(name, 0) + 1
  return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def describe_source(name: str, image_shape, labels: np.ndarray, groups: Sequence[str]) -> str:
  """The one-line log summary every source's ``describe()`` returns.

  Args:
    name: what the source is, e.g. ``"folder /data/bottle test"``.
    image_shape: ``(H, W, C)``.
    labels: ``(N,)`` 0/1 labels.
    groups: one group name (class, folder) per record.

  Returns:
    ``"<name>: N images HxWxC (normal: a, anomalous: b; group: count, ...)"``.
  """
  n_anom = int(np.sum(labels))
  h, w, c = image_shape
  return (
    f"{name}: {len(labels)} images {h}x{w}x{c} (normal: {len(labels) - n_anom}, "
    f"anomalous: {n_anom}; {count_summary(groups)})"
  )


class ArraySource:
  """Random-access source over images already held in memory as uint8.

  Attributes:
    images: uint8 ``(N, H, W, C)`` array.
    labels: int32 ``(N,)`` array, 0 normal / 1 anomalous.
    groups: one display name per record (its class or folder) used by :meth:`describe`.
    name: a short name for logs.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, groups: Sequence[str], name: str):
    """Wraps the arrays.

    Args:
      images: uint8 ``(N, H, W, C)`` array.
      labels: ``(N,)`` array of 0/1.
      groups: ``N`` display names (e.g. ``"digit 3"``).
      name: a short name for logs.

    Raises:
      ValueError: if the shapes or dtypes do not match the record contract.
    """
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int32)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],) or len(groups) != images.shape[0]:
      raise ValueError(
        f"{images.shape[0]} images but labels of shape {labels.shape} and {len(groups)} groups"
      )
    self.images = images
    self.labels = labels
    self.groups = list(groups)
    self.name = name

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of every image."""
    return tuple(int(d) for d in self.images.shape[1:])

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every entry of a record (nothing is read)."""
    return record_spec(self.image_shape)

  def __len__(self) -> int:
    """Number of records."""
    return int(self.images.shape[0])

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    """Returns record ``index`` (see the module docstring).

    Args:
      index: record position; negative values count from the end.

    Returns:
      The record dict.

    Raises:
      IndexError: if ``index`` is out of range.
    """
    i = check_index(index, len(self))
    return make_record(self.images[i], int(self.labels[i]), i)

  def describe(self) -> str:
    """One line for logs: size, shape, normal/anomalous counts and per-group counts.

    Returns:
      The summary string.
    """
    return describe_source(self.name, self.image_shape, self.labels, self.groups)
