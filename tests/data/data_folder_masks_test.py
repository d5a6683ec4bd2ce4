"""FolderSource with MVTec AD ground-truth masks (``ground_truth/<defect>/<stem>_mask.png``)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from dmad_jax.data import FolderSource, ImageReadError
from dmad_jax.data.pipeline import make_eval_batches

SIZE = 20


def _rect_mask(y0, y1, x0, x1, value=255, size=SIZE):
  mask = np.zeros((size, size), np.uint8)
  mask[y0:y1, x0:x1] = value
  return mask


def _write_mvtec(root):
  """train/good, test/{good,crack,hole} with gray and RGB PNGs, and masks for crack and hole."""
  rng = np.random.default_rng(0)
  gray = lambda: Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))  # noqa: E731
  rgb = lambda: Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))  # noqa: E731
  for folder, images in {
    "train/good": [gray(), rgb()],
    "test/good": [gray(), rgb()],
    "test/crack": [rgb(), gray()],
    "test/hole": [gray()],
  }.items():
    (root / folder).mkdir(parents=True)
    for i, img in enumerate(images):
      img.save(root / folder / f"{i:03d}.png")
  masks = {
    "crack/000_mask.png": _rect_mask(4, 12, 6, 16),
    "crack/001_mask.png": _rect_mask(0, 2, 0, 20, value=1),  # 0/1 masks count as binary too.
    "hole/000_mask.png": _rect_mask(10, 20, 10, 20),
  }
  for name, mask in masks.items():
    (root / "ground_truth" / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(root / "ground_truth" / name)
  return root


@pytest.fixture
def tree(tmp_path):
  return _write_mvtec(tmp_path / "bottle")


def test_test_records_carry_masks_and_train_records_do_not(tree):
  test = FolderSource(tree, "test", image_size=SIZE)
  assert test.has_masks and "masks from" in test.describe()
  assert test.defects == ["crack", "crack", "good", "good", "hole"]
  assert [p and p.rsplit("/", 2)[-2:] for p in test.mask_paths] == [
    ["crack", "000_mask.png"],
    ["crack", "001_mask.png"],
    None,
    None,
    ["hole", "000_mask.png"],
  ]
  want = [
    _rect_mask(4, 12, 6, 16),
    _rect_mask(0, 2, 0, 20),
    np.zeros((SIZE, SIZE)),
    np.zeros((SIZE, SIZE)),
    _rect_mask(10, 20, 10, 20),
  ]
  for i, expected in enumerate(want):
    rec = test[i]
    assert set(rec) == {"image", "label", "index", "mask"}
    assert rec["mask"].dtype == np.float32 and rec["mask"].shape == (SIZE, SIZE)
    np.testing.assert_array_equal(rec["mask"], (expected > 0).astype(np.float32))
    assert int(rec["label"]) == int(rec["mask"].any())
  train = FolderSource(tree, "train", image_size=SIZE)
  assert not train.has_masks and train.mask_paths is None
  assert set(train[0]) == {"image", "label", "index"}


def test_masks_follow_the_image_resize(tree):
  src = FolderSource(tree, "test", image_size=10)
  # Halving the size keeps the rectangles on even borders exactly; the 2-row band of 0/1 values
  # becomes one row.
  np.testing.assert_array_equal(src[0]["mask"], _rect_mask(2, 6, 3, 8, value=1, size=10))
  np.testing.assert_array_equal(src[1]["mask"], _rect_mask(0, 1, 0, 10, value=1, size=10))
  assert src[0]["image"].shape == (10, 10, 3)
  up = FolderSource(tree, "test", image_size=40)[4]["mask"]
  assert up.shape == (40, 40) and set(np.unique(up)) == {0.0, 1.0}
  # Upscaled 2x, the square [10, 20) covers [20, 40) up to a one-pixel bilinear border.
  assert up[21:, 21:].all() and not up[:19].any() and not up[:, :19].any()


def test_gray_files_become_three_identical_channels(tree):
  src = FolderSource(tree, "test", image_size=SIZE, channels=3)
  gray = src[1]["image"]  # test/crack/001.png is a gray PNG.
  assert gray.shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  rgb = src[0]["image"]
  assert not np.array_equal(rgb[..., 0], rgb[..., 1])
  assert FolderSource(tree, "test", image_size=SIZE, channels=1)[0]["image"].shape == (
    SIZE,
    SIZE,
    1,
  )


def test_eval_batches_carry_masks_and_pad_with_zero_masks(tree):
  src = FolderSource(tree, "test", image_size=SIZE)
  batches = list(make_eval_batches(src, global_batch_size=4, num_threads=0))
  assert [b["mask"].shape for b in batches] == [(4, SIZE, SIZE)] * 2
  last = batches[-1]
  assert last["_mask"].tolist() == [True, False, False, False]
  assert last["mask"][0].sum() == 100 and not last["mask"][1:].any()


def test_missing_mask_names_the_image_and_the_expected_mask(tree):
  (tree / "ground_truth" / "crack" / "001_mask.png").unlink()
  with pytest.raises(ValueError) as info:
    FolderSource(tree, "test", image_size=SIZE)
  msg = str(info.value)
  assert str(tree / "test" / "crack" / "001.png") in msg
  assert str(tree / "ground_truth" / "crack" / "001_mask.png") in msg


def test_defect_folder_without_any_masks_is_an_error(tree):
  (tree / "test" / "scratch").mkdir()
  Image.fromarray(_rect_mask(0, 1, 0, 1)).save(tree / "test" / "scratch" / "007.png")
  with pytest.raises(ValueError, match="scratch/007_mask.png"):
    FolderSource(tree, "test", image_size=SIZE)


def test_mask_without_image_names_both_files(tree):
  Image.fromarray(_rect_mask(0, 5, 0, 5)).save(tree / "ground_truth" / "hole" / "003_mask.png")
  with pytest.raises(ValueError, match="has no test image") as info:
    FolderSource(tree, "test", image_size=SIZE)
  msg = str(info.value)
  assert str(tree / "ground_truth" / "hole" / "003_mask.png") in msg
  assert str(tree / "test" / "hole" / "003.") in msg


def test_badly_named_mask_and_unknown_mask_folder(tree):
  Image.fromarray(_rect_mask(0, 5, 0, 5)).save(tree / "ground_truth" / "hole" / "000.png")
  with pytest.raises(ValueError, match=r"000\.png.*<image stem>_mask"):
    FolderSource(tree, "test", image_size=SIZE)
  (tree / "ground_truth" / "hole" / "000.png").unlink()
  (tree / "ground_truth" / "dent").mkdir()
  with pytest.raises(ValueError, match="has no test folder") as info:
    FolderSource(tree, "test", image_size=SIZE)
  assert str(tree / "test" / "dent") in str(info.value)


def test_mask_of_another_size_fails_or_is_skipped(tree, caplog):
  bad = tree / "ground_truth" / "crack" / "000_mask.png"
  Image.fromarray(_rect_mask(0, 4, 0, 4, size=16)).save(bad)
  with pytest.raises(ImageReadError, match="16x16 pixels but its image") as info:
    FolderSource(tree, "test", image_size=SIZE)
  assert str(bad) in str(info.value)
  with caplog.at_level(logging.WARNING):
    src = FolderSource(tree, "test", image_size=SIZE, validate="skip")
  assert str(bad) in caplog.text
  assert src.defects == ["crack", "good", "good", "hole"]
  assert src.mask_paths[0].endswith("crack/001_mask.png") and src.mask_paths[1] is None
  np.testing.assert_array_equal(src[0]["mask"], _rect_mask(0, 2, 0, 20, value=1))


def test_without_ground_truth_there_is_no_mask_key(tree):
  (tree / "ground_truth").rename(tree.parent / "elsewhere")
  src = FolderSource(tree, "test", image_size=SIZE)
  assert not src.has_masks and "mask" not in src[0] and "masks" not in src.describe()
