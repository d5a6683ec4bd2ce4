"""grain input pipelines over the random-access sources, and source construction from a config.

* :func:`make_train_iterator`: infinite, shuffled (new order every epoch), per-process sharded
  batches from a checkpointable grain ``DatasetIterator``.
* :func:`make_eval_batches`: one exact pass over a split, padded to full batches with a
  ``_mask`` marking real records, the same number of batches on every process.
* :func:`dataset_median`: per-pixel median image, used to initialise DMAD's background template.
* :func:`get_sources`: builds ``{"train", "test"}`` sources from a data config.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from dmad_jax.configs import schema

MASK_KEY = "_mask"


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  """Validates the batch / process arguments and returns the per-process batch size."""
  global_batch_size = operator.index(global_batch_size)
  process_count = operator.index(process_count)
  process_index = operator.index(process_index)
  if global_batch_size < 1 or process_count < 1:
    raise ValueError(
      f"global_batch_size ({global_batch_size}) and process_count ({process_count}) must be >= 1"
    )
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return global_batch_size // process_count


def make_train_iterator(
  source,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 2,
  prefetch_batches: int = 2,
) -> grain.DatasetIterator:
  """Infinite stream of shuffled training batches for this process.

  Every process derives the same global order (``seed`` shuffles the whole source; every epoch
  uses a new permutation, grain folds the epoch into the seed) and process ``p`` of ``P`` reads
  and decodes only the ``p``-th contiguous slice of each global batch. Stacking the processes'
  batches therefore gives exactly the global batch of a one-process run: the training batches,
  and so the loss curve, do not depend on how many hosts share the work. Batches run across
  epoch boundaries, so no record is ever dropped and every batch is full.

  The iterator is checkpointable: ``state = it.get_state()`` and, on an iterator built with the
  same arguments, ``it.set_state(state)`` resume at exactly the same batch. For orbax, save
  ``grain.checkpoint.CheckpointSave(it)`` and restore into a fresh iterator with
  ``grain.checkpoint.CheckpointRestore(it)`` (one JSON file per process).

  Args:
    source: random-access source (``__len__``/``__getitem__``) of record dicts.
    global_batch_size: batch size summed over all processes.
    seed: shuffle seed, an int in ``[0, 2**32)``.
    process_index: this process's index (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
    num_threads: threads decoding records; 0 reads in the calling thread.
    prefetch_batches: how many batches' worth of records the threads read ahead.

  Returns:
    A grain ``DatasetIterator`` of dicts of numpy arrays with a leading dimension of
    ``global_batch_size // process_count``.

  Raises:
    ValueError: if the batch size is not divisible by ``process_count``, ``process_index`` is out
      of range, ``seed`` is out of range, or the source is empty.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  seed = operator.index(seed)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  if len(source) == 0:
    raise ValueError("the training source has no records")
  # Repeat after shuffling so that each epoch is reshuffled with an epoch-dependent seed. Global
  # batch k is records [k*B, (k+1)*B) of that stream; cutting it into blocks of ``local`` and
  # keeping every P-th block from p gives process p its slice of every global batch.
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  # With no threads the prefetch buffer would never be filled, so it is switched off explicitly.
  buffer = max(0, int(prefetch_batches)) if num_threads > 0 else 0
  read = grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=buffer)
  return iter(ds.to_iter_dataset(read))


def eval_batch_count(num_records: int, global_batch_size: int) -> int:
  """Number of batches :func:`make_eval_batches` yields on every process.

  Args:
    num_records: records in the split.
    global_batch_size: batch size summed over all processes.

  Returns:
    ``ceil(num_records / global_batch_size)``.
  """
  return math.ceil(num_records / global_batch_size)


def eval_shard_indices(
  num_records: int, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
  """Record positions one process evaluates, in order, with -1 for padding.

  Global batch ``k`` covers records ``[k*B, (k+1)*B)`` (``B = global_batch_size``) and process
  ``p`` takes its ``p``-th contiguous block of ``B / P`` positions, so stacking the processes'
  batches in process order (e.g. ``jax.make_array_from_process_local_data``) restores the
  split's order. Only the last global batch holds padding.

  Args:
    num_records: records in the split.
    global_batch_size: batch size summed over all processes.
    process_index: this process's index.
    process_count: number of processes.

  Returns:
    int64 array of length ``eval_batch_count(...) * global_batch_size // process_count``.

  Raises:
    ValueError: for invalid batch / process arguments.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  batches = eval_batch_count(num_records, global_batch_size)
  starts = np.arange(batches, dtype=np.int64)[:, None] * global_batch_size
  positions = (starts + process_index * local + np.arange(local, dtype=np.int64)).reshape(-1)
  return np.where(positions < num_records, positions, -1)


class _PaddedView:
  """Random-access view of a source through a padded index list (see eval_shard_indices)."""

  def __init__(self, source, indices: np.ndarray):
    self._source = source
    self._indices = indices
    # A zero record in the source's own structure; index -1 marks it as padding for anyone who
    # forgets the mask.
    template = source[0]
    self._padding = {k: np.zeros_like(v) for k, v in template.items()}
    self._padding["index"] = np.full_like(template["index"], -1)
    self._padding[MASK_KEY] = np.False_

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    j = int(self._indices[i])
    if j < 0:
      return dict(self._padding)
    record = dict(self._source[j])
    record[MASK_KEY] = np.True_
    return record


def make_eval_batches(
  source,
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over a split in full-size batches, identical in count on every process.

  Each batch is a dict of numpy arrays with leading dimension ``global_batch_size //
  process_count`` plus a boolean ``"_mask"``, False on padding records (all-zero images, label 0,
  index -1). Over all processes the unmasked records cover the split exactly once; the layout is
  described in :func:`eval_shard_indices`.

  Args:
    source: random-access source of record dicts.
    global_batch_size: batch size summed over all processes.
    process_index: this process's index.
    process_count: number of processes.
    num_threads: threads reading batches ahead; 0 reads in the calling thread.

  Returns:
    An iterator over ``eval_batch_count(len(source), global_batch_size)`` batches.

  Raises:
    ValueError: for an empty source or invalid batch / process arguments.
  """
  indices = eval_shard_indices(
    len(source),
    global_batch_size=global_batch_size,
    process_index=process_index,
    process_count=process_count,
  )
  if len(source) == 0:
    raise ValueError("cannot evaluate an empty source")
  local = global_batch_size // process_count
  ds = grain.MapDataset.source(_PaddedView(source, indices)).batch(local)
  read = grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=2 * num_threads)
  return iter(ds.to_iter_dataset(read))


def dataset_median(source, *, max_items: int | None = None, num_threads: int = 4) -> np.ndarray:
  """Per-pixel median image of a source.

  Used to initialise DMAD's background template from the (normal) training images. All images
  are held in memory at once (``N * H * W * C`` float32), so cap ``max_items`` for large sets.

  Args:
    source: random-access source of record dicts with an ``"image"`` entry.
    max_items: use only the first ``max_items`` records (all when None).
    num_threads: threads reading records.

  Returns:
    float32 ``(H, W, C)`` median image.

  Raises:
    ValueError: if no record would be used.
  """
  n = len(source) if max_items is None else min(len(source), int(max_items))
  if n <= 0:
    raise ValueError(f"dataset_median needs at least one record (len={len(source)}, {max_items=})")
  ds = grain.MapDataset.source(source)[:n].map(lambda record: record["image"])
  read = grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=4 * num_threads)
  images = None
  for i, image in enumerate(ds.to_iter_dataset(read)):
    if images is None:
      images = np.empty((n, *np.shape(image)), np.float32)
    images[i] = image
  return np.median(images, axis=0).astype(np.float32)


# The keys of config.data each source reads, with their defaults (REQUIRED: no default).
REQUIRED = None
SOURCE_KEYS = {
  "digits": {
    "protocol": REQUIRED,
    "image_size": 32,
    "channels": 1,
    "test_fraction": 0.3,
    "seed": 0,
    "validation_fraction": 0.0,
  },
  "folder": {
    "root": REQUIRED,
    "image_size": REQUIRED,
    "channels": 3,
    "validate": True,
    "validation_fraction": 0.0,
    "seed": 0,
  },
  "tfds": {
    "tfds_name": REQUIRED,
    "protocol": REQUIRED,
    "image_size": REQUIRED,
    "channels": REQUIRED,
    "data_dir": None,
    "image_key": "image",
    "label_key": "label",
    "download": True,
  },
  "video": {
    "root": REQUIRED,
    "image_size": 256,
    "gray": False,
    "t_length": 5,
    "labels": None,
    "templates": "single",
    "resize": "cv2_bilinear",
  },
  "dagm": {
    "root": REQUIRED,
    "class_id": REQUIRED,
    "image_size": REQUIRED,
    "channels": 3,
    "validate": True,
  },
}
SOURCE_NAMES = tuple(SOURCE_KEYS)
SPLITS = ("train", "test", "validation")
_OPTIONAL_NONE = {("tfds", "data_dir"), ("video", "labels")}


def data_settings(data_config: Any) -> dict:
  """``config.data`` checked against its source's keys (:data:`SOURCE_KEYS`), with defaults.

  Raises:
    ConfigError: for an unknown source name, an unknown key (naming the closest known one), a
      missing required key or, for ``dagm``, a ``class_id`` that is not an int in 1..10.
  """
  if not hasattr(data_config, "get"):  # any object with attributes, e.g. a SimpleNamespace
    data_config = {k: v for k, v in vars(data_config).items() if not k.startswith("_")}
  name = data_config.get("name", None)
  if name not in SOURCE_KEYS:
    raise schema.ConfigError(
      f"config.data.name {name!r} is not a data source; known: {', '.join(SOURCE_NAMES)}"
    )
  settings = schema.section({"data": data_config}, "data", SOURCE_KEYS[name], extra=("name",))
  missing = [
    k
    for k, v in settings.items()
    if v is REQUIRED and k != "name" and (name, k) not in _OPTIONAL_NONE
  ]
  if missing:
    raise schema.ConfigError(
      f"data source {name!r} needs config.data.{missing[0]}"
      + (f" (and {', '.join(missing[1:])})" if missing[1:] else "")
    )
  if name == "dagm":
    class_id = settings["class_id"]
    if (
      isinstance(class_id, bool)
      or not isinstance(class_id, numbers.Integral)
      or not 1 <= class_id <= 10
    ):
      raise schema.ConfigError(
        f"config.data.class_id must be a DAGM 2007 class, an int in 1..10, got {class_id!r}"
      )
  return settings


def get_source(data_config: Any, split: str):
  """The source of one split of ``config.data``; nothing of the other splits is read.

  Keys read, by ``data_config.name`` (:data:`SOURCE_KEYS` has the defaults):

  * ``digits``: ``protocol`` (``'one_class=K'`` / ``'normal=A,B,..'``), ``image_size``,
    ``channels``, ``test_fraction``, ``seed``, ``validation_fraction`` (> 0: a labelled
    validation split carved from the train part, see :func:`dmad_jax.data.digits_sources`).
  * ``folder``: ``root``, ``image_size``, ``channels``, ``validate`` (``True``: decode every file
    of the split at construction and fail naming the unreadable ones; ``"skip"``: leave them out
    with a warning naming each file and the reason; ``False``: no start-up pass),
    ``validation_fraction`` and ``seed`` (without ``<root>/validation/``: the seeded share of
    ``train/good`` held out of training as the validation split).
  * ``tfds``: ``tfds_name``, ``protocol``, ``image_size``, ``channels``, ``data_dir``,
    ``image_key``, ``label_key``, ``download``.
  * ``video``: ``root`` (holding ``{training,testing}/frames/<video>/``), ``image_size``,
    ``gray``, ``t_length``, ``labels`` (label file or folder of the test split, see
    :func:`dmad_jax.data.labels.load_frame_labels`), ``templates`` (background template per
    video: 'single', 'scene' or 'video_transductive', see
    :func:`dmad_jax.data.video.video_sources`; the test split's templates are indexed by the
    training videos' names, which are listed, not read), ``resize`` ("cv2_bilinear", the
    released code's, or "pil_bilinear"). Records are clips, see
    :class:`dmad_jax.data.video.VideoFrameSource`.
  * ``dagm``: ``root`` (holding ``Class<k>/{Train,Test}/`` with ``Label/Labels.txt``),
    ``class_id`` (1..10), ``image_size``, ``channels`` (3 repeats the gray images), ``validate``
    (as for ``folder``). ``train`` is the non-defective training images, ``test`` every test image
    with its mask; records are served as the folder source's, see
    :class:`dmad_jax.data.dagm.DAGMSource`.

  Args:
    data_config: ``config.data`` (a ConfigDict or mapping).
    split: ``"train"``, ``"test"`` or ``"validation"``: for folder sources the
      ``<root>/validation/`` folder (normal images in ``good/``, anomalous ones beside it) or,
      without it, the images held out of ``train/good`` by ``validation_fraction``; for digits
      the labelled share of the train part set aside by ``validation_fraction``.

  Raises:
    ConfigError: for an invalid data config (see :func:`data_settings`).
    ValueError: for an unknown split, or ``validation`` of a source that has none.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  s = data_settings(data_config)
  name = s["name"]
  if split == "validation" and not (
    name == "folder" or (name == "digits" and s["validation_fraction"])
  ):
    raise ValueError(
      f"split 'validation' needs a folder dataset (<root>/validation/good/..., or "
      f"config.data.validation_fraction > 0) or digits with config.data.validation_fraction > 0; "
      f"data source {name!r} has none"
    )
  if name == "digits":
    from dmad_jax.data.digits import digits_sources, parse_protocol

    return digits_sources(
      normal_digits=parse_protocol(s["protocol"]),
      image_size=s["image_size"],
      channels=s["channels"],
      test_fraction=s["test_fraction"],
      seed=s["seed"],
      validation_fraction=s["validation_fraction"],
    )[split]
  if name == "folder":
    from dmad_jax.data.folder import FolderSource

    return FolderSource(
      s["root"],
      split,
      image_size=s["image_size"],
      channels=s["channels"],
      validate=s["validate"],
      validation_fraction=s["validation_fraction"],
      seed=s["seed"],
    )
  if name == "dagm":
    from dmad_jax.data.dagm import DAGMSource

    return DAGMSource(
      s["root"],
      s["class_id"],
      split,
      image_size=s["image_size"],
      channels=s["channels"],
      validate=s["validate"],
    )
  if name == "tfds":
    from dmad_jax.data.digits import parse_protocol
    from dmad_jax.data.tfds_source import tfds_sources

    return tfds_sources(
      s["tfds_name"],
      normal_classes=parse_protocol(s["protocol"]),
      image_size=s["image_size"],
      channels=s["channels"],
      data_dir=s["data_dir"],
      image_key=s["image_key"],
      label_key=s["label_key"],
      download=s["download"],
      splits=(split,),
    )[split]
  from dmad_jax.data.video import video_sources

  return video_sources(
    s["root"],
    templates=s["templates"],
    labels=s["labels"],
    image_size=s["image_size"],
    gray=s["gray"],
    t_length=s["t_length"],
    resize=s["resize"],
  )[split]


def element_spec(data_config: Any) -> dict:
  """The ``element_spec`` of the training records ``config.data`` describes, from the config
  alone (no file is listed or read): for code that needs shapes only, such as exporting a
  train step. Training records carry no mask (``folder``, ``dagm``: masks are test-only)."""
  s = data_settings(data_config)
  size = int(s["image_size"])
  if s["name"] == "video":
    from dmad_jax.data.video import clip_spec

    return clip_spec(size, s["t_length"])
  from dmad_jax.data.base import record_spec

  return record_spec((size, size, int(s["channels"])))


def get_sources(data_config: Any) -> dict[str, Any]:
  """``{"train": ..., "test": ...}``: :func:`get_source` of both splits."""
  return {split: get_source(data_config, split) for split in ("train", "test")}
