"""Input data for dmad_jax: random-access sources and grain pipelines.

Every source returns records ``{"image": float32 (H, W, C) in [-1, 1], "label": int32 (0 normal,
1 anomalous), "index": int32}`` and exposes ``image_shape`` and ``describe()``. TFDS support is
imported lazily from :mod:`dmad_jax.data.tfds_source` (optional ``tfds`` extra).
"""

from dmad_jax.data.digits import digits_sources, parse_protocol
from dmad_jax.data.folder import FolderSource
from dmad_jax.data.images import IMAGE_EXTENSIONS, ImageReadError, load_image, to_unit_range
from dmad_jax.data.pipeline import (
  MASK_KEY,
  dataset_median,
  element_spec,
  eval_batch_count,
  get_source,
  get_sources,
  make_eval_batches,
  make_train_iterator,
)

__all__ = [
  "IMAGE_EXTENSIONS",
  "MASK_KEY",
  "FolderSource",
  "ImageReadError",
  "dataset_median",
  "element_spec",
  "digits_sources",
  "eval_batch_count",
  "get_source",
  "get_sources",
  "load_image",
  "make_eval_batches",
  "make_train_iterator",
  "parse_protocol",
  "to_unit_range",
]
