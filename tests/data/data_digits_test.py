"""Tests of the scikit-learn digits one-class sources."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dmad_jax.data import digits_sources, parse_protocol
from dmad_jax.data.digits import _digits_uint8

CLASS_COUNTS = np.bincount(load_digits().target)  # 1797 images, 174..183 per digit.


@pytest.mark.parametrize(
  "text, want",
  [
    ("one_class=3", (3,)),
    ("normal=1,3,5,7,9", (1, 3, 5, 7, 9)),
    (" normal = 9, 1 ", (1, 9)),
    ("one_class=12", (12,)),
  ],
)
def test_parse_protocol(text, want):
  assert parse_protocol(text) == want


@pytest.mark.parametrize(
  "text", ["", "one_class=", "one_class=1,2", "normal=1,1", "normal=a", "odd", "normal=-1"]
)
def test_parse_protocol_rejects(text):
  with pytest.raises(ValueError, match="protocol"):
    parse_protocol(text)


def test_one_class_counts_and_labels():
  src = digits_sources(normal_digits=(3,))
  train, test = src["train"], src["test"]
  assert len(test) == 540  # ceil(0.3 * 1797)
  assert set(train.digits.tolist()) == {3}
  assert train.labels.tolist() == [0] * len(train)
  # Every 3 is in exactly one of the two parts.
  assert len(train) + int((test.digits == 3).sum()) == CLASS_COUNTS[3]
  np.testing.assert_array_equal(test.labels, (test.digits != 3).astype(np.int32))
  # The split is stratified: each digit's share of the test part is ~30 %.
  np.testing.assert_allclose(np.bincount(test.digits) / CLASS_COUNTS, 0.3, atol=0.01)
  for i in (0, len(test) - 1):
    rec = test[i]
    assert int(rec["label"]) == int(test.digits[i] != 3) and int(rec["index"]) == i


def test_odd_normal_protocol():
  src = digits_sources(normal_digits=parse_protocol("normal=1,3,5,7,9"))
  train, test = src["train"], src["test"]
  assert set(train.digits.tolist()) == {1, 3, 5, 7, 9}
  assert len(train) + int((test.digits % 2 == 1).sum()) == CLASS_COUNTS[1::2].sum()
  np.testing.assert_array_equal(test.labels, (test.digits % 2 == 0).astype(np.int32))
  assert set(test.digits.tolist()) == set(range(10))
  assert "normal: 273" in test.describe()


def test_split_is_deterministic_by_seed():
  a = digits_sources(normal_digits=(0,), seed=1)["test"]
  b = digits_sources(normal_digits=(0,), seed=1)["test"]
  c = digits_sources(normal_digits=(0,), seed=2)["test"]
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.digits, b.digits)
  assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("image_size, channels", [(32, 1), (16, 3), (8, 1)])
def test_shapes_and_range(image_size, channels):
  train = digits_sources(normal_digits=(5,), image_size=image_size, channels=channels)["train"]
  assert train.image_shape == (image_size, image_size, channels)
  images = np.stack([train[i]["image"] for i in range(len(train))])
  assert images.dtype == np.float32 and images.shape[1:] == (image_size, image_size, channels)
  assert images.min() == -1.0 and images.max() <= 1.0 and images.max() > 0.5
  if channels == 3:
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_native_size_keeps_the_original_pixels():
  digits = load_digits()
  test = digits_sources(normal_digits=(2,), image_size=8)["test"]
  # Record 0 of the (sorted) test part is some original image; find it and compare pixels.
  rec = test[0]["image"][..., 0]
  want = np.rint(digits.images * (255 / 16)) / 127.5 - 1
  assert np.abs(want - rec).max(axis=(1, 2)).min() < 1e-6


@pytest.mark.parametrize(
  "kwargs",
  [
    {"normal_digits": ()},
    {"normal_digits": (10,)},
    {"normal_digits": tuple(range(10))},
    {"normal_digits": (1,), "test_fraction": 1.0},
  ],
)
def test_invalid_arguments(kwargs):
  with pytest.raises(ValueError):
    digits_sources(**kwargs)


def test_validation_split_is_a_labelled_stratified_share_of_the_train_part():
  plain = digits_sources(normal_digits=(1, 3, 5, 7, 9))
  src = digits_sources(normal_digits=(1, 3, 5, 7, 9), validation_fraction=0.2)
  train, val, test = src["train"], src["validation"], src["test"]
  # The test split does not move; train and validation split the train part between them.
  np.testing.assert_array_equal(test.ids, plain["test"].ids)
  part = np.setdiff1d(np.arange(CLASS_COUNTS.sum()), test.ids)
  assert not np.intersect1d(train.ids, val.ids).size and not np.intersect1d(val.ids, test.ids).size
  np.testing.assert_array_equal(np.union1d(train.ids, val.ids[val.labels == 0]), plain["train"].ids)
  assert np.isin(val.ids, part).all()
  # Validation holds every digit, ~20% of each digit's train part, labelled as the test split.
  part_counts = CLASS_COUNTS - np.bincount(test.digits, minlength=10)
  np.testing.assert_allclose(np.bincount(val.digits, minlength=10) / part_counts, 0.2, atol=0.01)
  np.testing.assert_array_equal(val.labels, (val.digits % 2 == 0).astype(np.int32))
  assert set(train.digits.tolist()) == {1, 3, 5, 7, 9} and train.labels.max() == 0
  np.testing.assert_array_equal(val.images, _digits_uint8(32, 1)[0][val.ids])
  # Seeded: the same call gives the same split, another seed another one.
  again = digits_sources(normal_digits=(1, 3, 5, 7, 9), validation_fraction=0.2)["validation"]
  other = digits_sources(normal_digits=(1, 3, 5, 7, 9), validation_fraction=0.2, seed=1)
  np.testing.assert_array_equal(again.ids, val.ids)
  assert not np.array_equal(other["validation"].ids, val.ids)
  assert "validation" not in plain
  with pytest.raises(ValueError, match="validation_fraction"):
    digits_sources(normal_digits=(1,), validation_fraction=1.0)
