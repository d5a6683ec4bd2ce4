"""Round trip through a real (tiny) TFDS ArrayRecord dataset built by the test."""

import sys
import types

import numpy as np
import pytest

from dmad_jax.data import get_sources
from dmad_jax.data import tfds_source as tfds_lib

NAME = "dmad_tiny_digits_test"  # The snake_case name TFDS registers for the builder below.
SPLITS = {"train": (30, 0), "test": (12, 100)}  # split: (records, pixel offset)


def _pixel(split: str, i: int) -> int:
  """The constant pixel value of record ``i`` of ``split``; unique within a split."""
  return (SPLITS[split][1] + 5 * i) % 256


def _label(i: int) -> int:
  return i % 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Prepares the dataset once for the module, in the ArrayRecord format tfds.data_source reads."""
  import tensorflow_datasets as tfds

  # Defining the class registers it with TFDS under NAME; this fixture runs once per session.
  class DmadTinyDigitsTest(tfds.core.GeneratorBasedBuilder):
    """8x8 gray images of one constant value each, 3 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=3),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
      for i in range(SPLITS[split][0]):
        image = np.full((8, 8, 1), _pixel(split, i), np.uint8)
        yield f"{split}_{i}", {"image": image, "label": _label(i)}

  path = tmp_path_factory.mktemp("tfds")
  DmadTinyDigitsTest(data_dir=str(path), file_format="array_record").download_and_prepare()
  return str(path)


def _generator_index(split: str, image: np.ndarray) -> int:
  """Recovers which generated example a decoded record is, from its constant pixel value."""
  pixel = np.rint((image + 1) * 127.5).astype(int)
  assert (pixel == pixel.flat[0]).all()
  return [_pixel(split, i) for i in range(SPLITS[split][0])].index(int(pixel.flat[0]))


def test_counts_labels_and_pixels(data_dir):
  src = tfds_lib.tfds_sources(
    NAME, normal_classes=(0, 2), image_size=8, channels=1, data_dir=data_dir, download=False
  )
  train, test = src["train"], src["test"]
  assert len(train) == 20 and len(test) == 12
  assert train.labels.tolist() == [0] * 20
  # TFDS stores examples in a key-hash order, so identify each record by its pixel value.
  seen = []
  for j in range(len(train)):
    rec = train[j]
    assert int(rec["index"]) == j and int(rec["label"]) == 0
    assert rec["image"].shape == (8, 8, 1) and rec["image"].dtype == np.float32
    i = _generator_index("train", rec["image"])
    assert train.classes[j] == _label(i)
    seen.append(i)
  assert sorted(seen) == [i for i in range(30) if _label(i) in (0, 2)]
  seen = []
  for j in range(len(test)):
    rec = test[j]
    i = _generator_index("test", rec["image"])
    assert int(rec["label"]) == int(_label(i) == 1) == test.labels[j]
    seen.append(i)
  assert sorted(seen) == list(range(12))
  assert "class 1: 4" in test.describe() and "anomalous: 4" in test.describe()


def test_resize_channels_and_label_cache(data_dir):
  tfds_lib._class_labels.cache_clear()
  for _ in range(2):
    src = tfds_lib.tfds_sources(
      NAME, normal_classes=(1,), image_size=12, channels=3, data_dir=data_dir, download=False
    )
  # Labels were scanned once per split; the second build reused them.
  info = tfds_lib._class_labels.cache_info()
  assert (info.misses, info.hits) == (2, 2)
  train = src["train"]
  assert len(train) == 10 and train.image_shape == (12, 12, 3)
  rec = train[3]
  assert rec["image"].shape == (12, 12, 3)
  assert _label(_generator_index("train", rec["image"])) == 1


def test_get_sources_dispatch(data_dir):
  config = types.SimpleNamespace(
    name="tfds",
    tfds_name=NAME,
    protocol="one_class=0",
    image_size=8,
    channels=1,
    data_dir=data_dir,
  )
  src = get_sources(config)
  assert len(src["train"]) == 10 and len(src["test"]) == 12


def test_bad_keys_and_classes(data_dir):
  kwargs = dict(image_size=8, channels=1, data_dir=data_dir, download=False)
  with pytest.raises(KeyError, match="img"):
    tfds_lib.tfds_sources(NAME, normal_classes=(0,), image_key="img", **kwargs)
  with pytest.raises(ValueError, match="classes 0..2"):
    tfds_lib.tfds_sources(NAME, normal_classes=(3,), **kwargs)
  with pytest.raises(ValueError, match="every class"):
    tfds_lib.tfds_sources(NAME, normal_classes=(0, 1, 2), **kwargs)


def test_missing_tfds_names_the_extra(monkeypatch):
  # A None entry in sys.modules makes `import tensorflow_datasets` raise ImportError.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"pip install dmad_jax\[tfds\]"):
    tfds_lib.tfds_sources("never_opened", normal_classes=(0,), image_size=8, channels=1)
