"""One-class sources over TensorFlow Datasets image classification sets (mnist, cifar10, ...).

Records are read with ``tfds.data_source``: random access into the prepared ArrayRecord files,
decoded to numpy without building any ``tf.data`` pipeline, which is what grain expects. The
dataset must be (or will be, with ``download=True``) prepared in the ``array_record`` file
format; a copy prepared earlier as TFRecord cannot be read this way.

Protocol, as for the digits: train = the records of the train split whose class is normal (all
labelled 0); test = every record of the test split, labelled 1 when its class is not normal.

``tensorflow-datasets`` is an optional dependency, imported only when a TFDS source is built.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from dmad_jax.data.base import check_index, describe_source, make_record, record_spec
from dmad_jax.data.images import check_image_options, prepare_array

# Records fetched per batched read when scanning labels; bounds the memory of one read.
_LABEL_CHUNK = 4096


def _import_tfds():
  """Imports tensorflow_datasets or explains how to install it."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as err:
    raise ImportError(
      "TFDS data sources need tensorflow-datasets (and TensorFlow); install them with "
      "`pip install dmad_jax[tfds]`"
    ) from err
  _hide_gpus_from_tensorflow()
  return tfds


def _hide_gpus_from_tensorflow():
  """TensorFlow, which TFDS imports, must not take GPU memory from JAX: it is imported only here,
  when a TFDS source is built, and sees no GPU."""
  try:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
  except (ImportError, RuntimeError):  # RuntimeError: TensorFlow's devices already initialised
    pass


@functools.cache
def _open(name: str, split: str, data_dir: str | None, download: bool, skip_key: str | None):
  """Opens (and caches) one split as a TFDS random-access data source.

  Args:
    name: registered TFDS name, optionally with config and version (``"mnist:3.0.1"``).
    split: split name or TFDS split expression.
    data_dir: TFDS data folder (None: TFDS default).
    download: let TFDS download and prepare the dataset when it is missing.
    skip_key: a feature left undecoded (the image, when only labels are needed).

  Returns:
    The TFDS data source.
  """
  tfds = _import_tfds()
  decoders = {skip_key: tfds.decode.SkipDecoding()} if skip_key else None
  return tfds.data_source(
    name,
    split=split,
    data_dir=data_dir,
    download=download,
    decoders=decoders,
    # Without this, TFDS picks the TFRecord default whenever data_dir is given, and then either
    # prepares a format it cannot random-access or reports a confusing NotImplementedError.
    builder_kwargs={"file_format": "array_record"},
  )


@functools.cache
def _class_labels(
  name: str, split: str, data_dir: str | None, download: bool, image_key: str, label_key: str
) -> np.ndarray:
  """Class label of every record of a split, read once per process and cached.

  The image feature is left undecoded and records are fetched in batches, which makes the scan
  several times faster than reading full records (roughly 1-2 s for 60k MNIST-sized records).

  Returns:
    Read-only int64 ``(N,)`` array.
  """
  ds = _open(name, split, data_dir, download, image_key)
  labels = np.empty(len(ds), np.int64)
  for start in range(0, len(ds), _LABEL_CHUNK):
    stop = min(len(ds), start + _LABEL_CHUNK)
    records = ds.__getitems__(list(range(start, stop)))
    labels[start:stop] = [int(r[label_key]) for r in records]
  labels.setflags(write=False)
  return labels


def _check_features(ds, name: str, image_key: str, label_key: str) -> int | None:
  """Checks the feature keys exist; returns the number of classes when the label declares it."""
  features = ds.dataset_info.features
  keys = list(features.keys())
  for role, key in (("image_key", image_key), ("label_key", label_key)):
    if key not in keys:
      raise KeyError(f"TFDS dataset {name!r} has no feature {key!r} ({role}); features: {keys}")
  return getattr(features[label_key], "num_classes", None)


class TfdsSource:
  """A filtered, relabelled view of one TFDS split.

  Attributes:
    name: the TFDS dataset name.
    split: the TFDS split read.
    source_indices: int64 ``(N,)`` position of every record in the TFDS split.
    classes: int64 ``(N,)`` original class label of every record.
    labels: int32 ``(N,)``: 0 when the class is normal, 1 otherwise.
  """

  def __init__(
    self,
    data_source,
    *,
    name: str,
    split: str,
    source_indices: np.ndarray,
    classes: np.ndarray,
    normal_classes: Sequence[int],
    image_size: int,
    channels: int,
    image_key: str,
  ):
    """Wraps a TFDS data source.

    Args:
      data_source: the ``tfds.data_source`` of the split.
      name: the TFDS dataset name (for logs).
      split: the split name (for logs).
      source_indices: the records of the split to expose, in order.
      classes: their class labels.
      normal_classes: the normal class ids.
      image_size: output height and width.
      channels: 1 or 3.
      image_key: the image feature's key.
    """
    self._ds = data_source
    self.name = name
    self.split = split
    self.source_indices = np.asarray(source_indices, np.int64)
    self.classes = np.asarray(classes, np.int64)
    self.labels = (~np.isin(self.classes, list(normal_classes))).astype(np.int32)
    self._image_size = int(image_size)
    self._channels = int(channels)
    self._image_key = image_key

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of every record's image."""
    return (self._image_size, self._image_size, self._channels)

  @property
  def element_spec(self) -> dict:
    """Shape and dtype of every entry of a record (nothing is read)."""
    return record_spec(self.image_shape)

  def __len__(self) -> int:
    """Number of records."""
    return int(self.source_indices.shape[0])

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    """Reads and converts record ``index``.

    Args:
      index: record position; negative values count from the end.

    Returns:
      ``{"image": float32 (H, W, C) in [-1, 1], "label": int32, "index": int32}``.

    Raises:
      IndexError: if ``index`` is out of range.
    """
    i = check_index(index, len(self))
    record = self._ds[int(self.source_indices[i])]
    image = prepare_array(
      np.asarray(record[self._image_key]), image_size=self._image_size, channels=self._channels
    )
    return make_record(image, int(self.labels[i]), i)

  def describe(self) -> str:
    """One line for logs: dataset, split, size, shape and per-class counts.

    Returns:
      The summary string.
    """
    groups = [f"class {k}" for k in self.classes]
    return describe_source(f"tfds {self.name} {self.split}", self.image_shape, self.labels, groups)


def tfds_sources(
  name: str,
  *,
  normal_classes: Sequence[int],
  image_size: int,
  channels: int,
  data_dir: str | os.PathLike | None = None,
  image_key: str = "image",
  label_key: str = "label",
  train_split: str = "train",
  test_split: str = "test",
  download: bool = True,
  splits: Sequence[str] = ("train", "test"),
) -> dict[str, TfdsSource]:
  """Builds the one-class train and test sources of a TFDS image classification set.

  Args:
    name: registered TFDS name, e.g. ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``.
    normal_classes: class ids treated as normal.
    image_size: output height and width (bilinear resize when the stored size differs).
    channels: 1 (gray; colour converted to luma) or 3 (RGB; gray replicated).
    data_dir: TFDS data folder; None uses TFDS's default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    image_key: name of the image feature.
    label_key: name of the integer class feature.
    train_split: split the normal training records come from.
    test_split: split evaluated on.
    download: let TFDS download and prepare the data when it is not in ``data_dir``.
    splits: which of ``"train"`` and ``"test"`` to build (the others are not opened).

  Returns:
    ``{split: source}`` for each of ``splits``.

  Raises:
    ImportError: if tensorflow-datasets is not installed.
    KeyError: if ``image_key`` or ``label_key`` is not a feature of the dataset.
    ValueError: if ``normal_classes`` is empty, out of range, covers every class, or selects no
      training record; or for an invalid ``image_size`` or ``channels``.
  """
  normal = tuple(sorted({int(k) for k in normal_classes}))
  if not normal or min(normal) < 0:
    raise ValueError(f"normal_classes must be non-empty non-negative ids, got {normal_classes}")
  check_image_options(image_size, channels)
  data_dir = None if data_dir is None else os.fspath(data_dir)

  out = {}
  for split_key, split in (("train", train_split), ("test", test_split)):
    if split_key not in splits:
      continue
    ds = _open(name, split, data_dir, bool(download), None)
    num_classes = _check_features(ds, name, image_key, label_key)
    if num_classes is not None:
      if max(normal) >= num_classes:
        raise ValueError(f"{name!r} has classes 0..{num_classes - 1}; got normal={normal}")
      if len(normal) == num_classes:
        raise ValueError(f"normal={normal} covers every class of {name!r}: no anomalies left")
    classes = _class_labels(name, split, data_dir, bool(download), image_key, label_key)
    if split_key == "train":
      indices = np.flatnonzero(np.isin(classes, normal))
      if indices.size == 0:
        raise ValueError(f"no record of split {split!r} of {name!r} has a class in {normal}")
    else:
      indices = np.arange(len(classes))
    out[split_key] = TfdsSource(
      ds,
      name=name,
      split=split,
      source_indices=indices,
      classes=classes[indices],
      normal_classes=normal,
      image_size=image_size,
      channels=channels,
      image_key=image_key,
    )
  return out
