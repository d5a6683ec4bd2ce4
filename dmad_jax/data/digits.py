"""One-class anomaly detection on scikit-learn's handwritten digits (no download needed).

``sklearn.datasets.load_digits`` ships 1797 real 8x8 handwritten digits with values 0..16. They
are scaled to 0..255 (``round(x * 255 / 16)``), stored as uint8 and upsampled to
``image_size`` with PIL's bilinear resize, which samples at pixel centres (the
``align_corners=False`` convention), so the 8x8 grid maps onto the whole output without a
half-pixel shift.

Protocols (see :func:`parse_protocol`): ``one_class=k`` makes digit ``k`` normal and the other
nine anomalous; ``normal=1,3,5,7,9`` makes a set of digits normal (the DMAD paper's toy setting:
odd digits normal, even digits anomalous).

The 1797 images are split once, stratified by digit and seeded: the train split holds only the
normal digits of the train part, the test split holds every digit of the test part, labelled 1
when the digit is not normal. With ``validation_fraction > 0`` a stratified share of the train
part is set aside first as a labelled ``validation`` split (every digit, labelled as the test
split), used to choose settings and to fit the decision threshold; the test split is only
reported.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from dmad_jax.data.base import ArraySource
from dmad_jax.data.images import prepare_array

_PROTOCOL_HELP = (
  "expected 'one_class=K' (e.g. 'one_class=3') or 'normal=A,B,...' (e.g. 'normal=1,3,5,7,9')"
)


def parse_protocol(protocol: str) -> tuple[int, ...]:
  """Parses a one-class protocol string into the sorted tuple of normal class ids.

  Args:
    protocol: ``'one_class=K'`` (a single normal class) or ``'normal=A,B,...'`` (several normal
      classes). Whitespace is ignored.

  Returns:
    The normal class ids, sorted, e.g. ``(1, 3, 5, 7, 9)``.

  Raises:
    ValueError: if the string does not follow either form, names a negative or repeated class,
      or ``one_class`` names more than one class.
  """
  text = re.sub(r"\s+", "", str(protocol))
  match = re.fullmatch(r"(one_class|normal)=(\d+(?:,\d+)*)", text)
  if match is None:
    raise ValueError(f"invalid protocol {protocol!r}: {_PROTOCOL_HELP}")
  kind, values = match.groups()
  classes = [int(v) for v in values.split(",")]
  if kind == "one_class" and len(classes) != 1:
    raise ValueError(f"invalid protocol {protocol!r}: one_class takes a single class id")
  if len(set(classes)) != len(classes):
    raise ValueError(f"invalid protocol {protocol!r}: repeated class ids")
  return tuple(sorted(classes))


class DigitsSource(ArraySource):
  """An :class:`~dmad_jax.data.base.ArraySource` that also keeps each record's digit.

  Attributes:
    digits: int32 ``(N,)`` digit id (0..9) of every record.
    ids: int64 ``(N,)`` position of every record in ``sklearn.datasets.load_digits()``.
  """

  def __init__(
    self,
    images: np.ndarray,
    digits: np.ndarray,
    normal: tuple[int, ...],
    name: str,
    ids: np.ndarray,
  ):
    """Builds the source.

    Args:
      images: uint8 ``(N, H, W, C)`` images.
      digits: ``(N,)`` digit ids.
      normal: the normal digits; every other digit is labelled 1.
      name: a short name for logs.
      ids: ``(N,)`` positions in the scikit-learn data set.
    """
    digits = np.asarray(digits, np.int32)
    labels = (~np.isin(digits, normal)).astype(np.int32)
    super().__init__(images, labels, [f"digit {d}" for d in digits], name=name)
    self.digits = digits
    self.ids = np.asarray(ids, np.int64)


@functools.cache
def _digits_uint8(image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as uint8 ``(N, S, S, C)`` plus their ``(N,)`` digit ids; cached."""
  # Imported here so that importing dmad_jax.data does not pay for scikit-learn.
  from sklearn.datasets import load_digits

  bunch = load_digits()
  raw = np.rint(np.asarray(bunch.images, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  images = np.stack(
    [prepare_array(im, image_size=image_size, channels=channels) for im in raw], axis=0
  )
  images.setflags(write=False)  # Shared by every source built from the cache.
  digits = np.asarray(bunch.target, np.int32)
  digits.setflags(write=False)
  return images, digits


def digits_sources(
  *,
  normal_digits: Sequence[int],
  image_size: int = 32,
  channels: int = 1,
  test_fraction: float = 0.3,
  seed: int = 0,
  validation_fraction: float = 0.0,
) -> dict[str, DigitsSource]:
  """Builds the train and test sources of the digits one-class benchmark.

  Args:
    normal_digits: the digits treated as normal (e.g. ``(3,)`` or ``(1, 3, 5, 7, 9)``).
    image_size: output height and width (the 8x8 digits are upsampled bilinearly).
    channels: 1 (gray) or 3 (gray replicated).
    test_fraction: fraction of the 1797 images held out for the test split.
    seed: ``random_state`` of the stratified split (and of the validation split).
    validation_fraction: when > 0, this share of the train part (stratified by digit, seeded)
      becomes a labelled ``validation`` split holding *every* digit of it, labelled as the test
      split; training uses the normal digits of the rest only. 0: no validation split.

  Returns:
    ``{"train": source, "test": source}`` plus ``"validation"`` when ``validation_fraction > 0``.
    Train holds the normal digits of the train part (all labelled 0); test holds all digits of
    the test part, labelled 1 when not normal.

  Raises:
    ValueError: if ``normal_digits`` is empty, outside 0..9, or covers all ten digits (no
      anomalies left to detect), or ``test_fraction`` is not in (0, 1), or
      ``validation_fraction`` is not in [0, 1).
  """
  from sklearn.model_selection import train_test_split

  normal = tuple(sorted({int(d) for d in normal_digits}))
  if not normal or not all(0 <= d <= 9 for d in normal):
    raise ValueError(f"normal_digits must be a non-empty subset of 0..9, got {normal_digits}")
  if len(normal) == 10:
    raise ValueError("normal_digits covers all ten digits: the test split would have no anomalies")
  if not 0.0 < float(test_fraction) < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if not 0.0 <= float(validation_fraction) < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")

  images, digits = _digits_uint8(int(image_size), int(channels))
  train_idx, test_idx = train_test_split(
    np.arange(len(digits)),
    test_size=float(test_fraction),
    stratify=digits,
    random_state=int(seed),
  )
  # Sorting keeps records in the dataset's original order; the seed alone decides membership.
  train_idx = np.sort(train_idx)
  test_idx = np.sort(test_idx)
  splits = {"test": test_idx}
  if validation_fraction:
    train_idx, val_idx = train_test_split(
      train_idx,
      test_size=float(validation_fraction),
      stratify=digits[train_idx],
      random_state=int(seed),
    )
    train_idx, splits["validation"] = np.sort(train_idx), np.sort(val_idx)
  splits["train"] = train_idx[np.isin(digits[train_idx], normal)]

  tag = f"digits normal={','.join(map(str, normal))} seed={seed}"
  return {
    split: DigitsSource(images[idx], digits[idx], normal, name=f"{tag} {split}", ids=idx)
    for split, idx in splits.items()
  }
