"""Tests of the MVTec-style FolderSource."""

import logging

import numpy as np
import pytest
from PIL import Image

from dmad_jax.data import FolderSource, ImageReadError
from dmad_jax.data.images import IMAGE_EXTENSIONS

RNG = np.random.default_rng(0)


def _rand(shape, dtype=np.uint8, high=256):
  return RNG.integers(0, high, shape).astype(dtype)


def _write_tree(root):
  """Builds a small tree whose train/good mixes formats, modes and sizes."""
  good = root / "train" / "good"
  good.mkdir(parents=True)
  Image.fromarray(_rand((20, 20))).save(good / "a_gray.png")
  Image.fromarray(_rand((24, 16, 3))).save(good / "b_rgb.jpg")
  Image.fromarray(_rand((16, 16, 4))).save(good / "c_rgba.png")
  Image.fromarray(_rand((16, 16), np.uint16, 65536)).save(good / "d_16bit.png")
  Image.fromarray(_rand((10, 10, 3))).save(good / "e_rgb.BMP")  # Upper-case extension.
  (good / ".DS_Store").write_bytes(b"\0\1")
  (good / "notes.txt").write_text("not an image")
  for name, count in (("good", 2), ("crack", 2), ("scratch", 1)):
    folder = root / "test" / name
    folder.mkdir(parents=True)
    for i in range(count):
      Image.fromarray(_rand((16, 16, 3))).save(folder / f"{i:03d}.png")
  return root


@pytest.fixture
def tree(tmp_path):
  return _write_tree(tmp_path / "ds")


def _truncate_copy(src, dst):
  data = src.read_bytes()
  dst.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("channels", [1, 3])
def test_train_split_loads_every_format(tree, channels, caplog):
  with caplog.at_level(logging.WARNING):
    src = FolderSource(tree, "train", image_size=16, channels=channels)
  assert len(src) == 5
  assert [p.rsplit("/", 1)[-1] for p in src.paths] == [
    "a_gray.png",
    "b_rgb.jpg",
    "c_rgba.png",
    "d_16bit.png",
    "e_rgb.BMP",
  ]
  assert src.defects == ["good"] * 5 and src.labels.tolist() == [0] * 5
  assert src.image_shape == (16, 16, channels)
  for i in range(len(src)):
    rec = src[i]
    assert rec["image"].shape == (16, 16, channels) and rec["image"].dtype == np.float32
    assert -1.0 <= rec["image"].min() and rec["image"].max() <= 1.0
    assert rec["label"].dtype == np.int32 and int(rec["label"]) == 0
    assert rec["index"].dtype == np.int32 and int(rec["index"]) == i
  # The unknown extension is reported, the hidden file is not.
  assert "notes.txt" in caplog.text and ".DS_Store" not in caplog.text


def test_test_split_labels_and_defects(tree):
  src = FolderSource(tree, "test", image_size=8)
  assert src.defects == ["crack", "crack", "good", "good", "scratch"]
  assert src.labels.tolist() == [1, 1, 0, 0, 1]
  assert src.paths == sorted(src.paths)
  assert "crack: 2" in src.describe() and "anomalous: 3" in src.describe()
  assert src[-1]["index"] == 4
  with pytest.raises(IndexError):
    src[5]


def test_pixel_values_of_a_gray_png(tmp_path):
  good = tmp_path / "train" / "good"
  good.mkdir(parents=True)
  pixels = _rand((6, 6))
  Image.fromarray(pixels).save(good / "x.png")
  rec = FolderSource(tmp_path, "train", image_size=6, channels=3)[0]
  np.testing.assert_allclose(rec["image"][..., 2], pixels / 127.5 - 1, atol=1e-6)


def test_corrupt_file_fails_at_construction(tree):
  bad = tree / "test" / "crack" / "002.png"
  _truncate_copy(tree / "test" / "crack" / "000.png", bad)
  with pytest.raises(ImageReadError) as info:
    FolderSource(tree, "test", image_size=8)
  assert str(bad) in str(info.value)


def test_skip_drops_corrupt_file_with_warning(tree, caplog):
  bad = tree / "test" / "crack" / "002.png"
  _truncate_copy(tree / "test" / "crack" / "000.png", bad)
  with caplog.at_level(logging.WARNING):
    src = FolderSource(tree, "test", image_size=8, validate="skip")
  assert len(src) == 5 and str(bad) not in src.paths
  assert str(bad) in caplog.text


def test_no_validation_defers_the_error_to_reading(tree):
  bad = tree / "test" / "scratch" / "zzz.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  src = FolderSource(tree, "test", image_size=8, validate=False)
  assert src.paths[-1] == str(bad)
  with pytest.raises(ImageReadError, match="zzz.png"):
    src[len(src) - 1]


def test_empty_folder_is_named(tree):
  empty = tree / "test" / "hole"
  empty.mkdir()
  (empty / "readme.md").write_text("x")
  with pytest.raises(ValueError, match="hole") as info:
    FolderSource(tree, "test", image_size=8)
  assert str(empty) in str(info.value)
  assert all(ext in str(info.value) for ext in IMAGE_EXTENSIONS)


def test_missing_root_and_split_show_the_layout(tmp_path, tree):
  with pytest.raises(FileNotFoundError, match="expected layout") as info:
    FolderSource(tmp_path / "nope", "train", image_size=8)
  assert str(tmp_path / "nope") in str(info.value)
  (tmp_path / "only_train" / "train" / "good").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="expected layout") as info:
    FolderSource(tmp_path / "only_train", "test", image_size=8)
  assert str(tmp_path / "only_train" / "test") in str(info.value)


def test_bad_arguments(tree):
  with pytest.raises(ValueError, match="split"):
    FolderSource(tree, "val", image_size=8)
  with pytest.raises(ValueError, match="validate"):
    FolderSource(tree, "train", image_size=8, validate="yes")


def _write_goods(root, n):
  good = root / "train" / "good"
  good.mkdir(parents=True)
  for i in range(n):
    Image.fromarray(_rand((8, 8, 3))).save(good / f"{i:03d}.png")
  (root / "test" / "good").mkdir(parents=True)
  Image.fromarray(_rand((8, 8, 3))).save(root / "test" / "good" / "t.png")
  return root


def test_validation_fraction_holds_a_seeded_share_of_train_good_out_of_training(tmp_path):
  root = _write_goods(tmp_path / "ds", 10)
  whole = FolderSource(root, "train", image_size=8).paths
  train = FolderSource(root, "train", image_size=8, validation_fraction=0.2)
  val = FolderSource(root, "validation", image_size=8, validation_fraction=0.2)
  assert (len(train), len(val)) == (8, 2)
  assert sorted(train.paths + val.paths) == whole and not set(train.paths) & set(val.paths)
  assert train.paths == sorted(train.paths) and val.labels.tolist() == [0, 0]
  assert "2 of the 10 images of train/good held out for validation" in val.describe()
  # Deterministic for a seed, another seed holds out other images; the test split is untouched.
  again = FolderSource(root, "validation", image_size=8, validation_fraction=0.2, seed=0)
  assert again.paths == val.paths
  others = {
    tuple(FolderSource(root, "validation", image_size=8, validation_fraction=0.2, seed=s).paths)
    for s in range(1, 6)
  }
  assert others - {tuple(val.paths)}
  test = FolderSource(root, "test", image_size=8, validation_fraction=0.2)
  assert len(test) == 1
  # At least one image is held out, and at least one is left to train on.
  assert len(FolderSource(root, "validation", image_size=8, validation_fraction=0.01)) == 1
  one = _write_goods(tmp_path / "one", 1)
  with pytest.raises(ValueError, match="1 image.*validation_fraction") as info:
    FolderSource(one, "train", image_size=8, validation_fraction=0.2)
  assert str(one / "train" / "good") in str(info.value)


def test_a_validation_folder_takes_precedence_over_the_fraction(tmp_path):
  root = _write_goods(tmp_path / "ds", 10)
  (root / "validation" / "good").mkdir(parents=True)
  Image.fromarray(_rand((8, 8, 3))).save(root / "validation" / "good" / "v.png")
  train = FolderSource(root, "train", image_size=8, validation_fraction=0.2)
  val = FolderSource(root, "validation", image_size=8, validation_fraction=0.2)
  assert len(train) == 10 and [p.rsplit("/", 1)[-1] for p in val.paths] == ["v.png"]
