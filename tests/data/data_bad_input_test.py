"""FolderSource on inputs that are unusual but valid: mixed sizes, gray / RGBA / 16-bit files.

Errors on bad files (empty folders, corrupt or truncated images, masks that do not fit, label
files of the wrong length) are tested in data_folder_test.py, data_images_test.py,
data_video_test.py and, with the workdir left intact, tests/train/bad_input_test.py.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from dmad_jax.data import FolderSource


def _tree(root):
  for folder in ("train/good", "test/good", "test/crack"):
    (root / folder).mkdir(parents=True)
  for folder in ("test/good", "test/crack"):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / folder / "0.png")
  return root / "train" / "good"


def test_mixed_sizes_are_resized_with_a_note_naming_an_example(tmp_path, caplog):
  good = _tree(tmp_path)
  for i in range(3):
    Image.fromarray(np.full((8, 8), 50 * i, np.uint8)).save(good / f"{i}.png")
  Image.fromarray(np.full((12, 20), 200, np.uint8)).save(good / "wide.png")
  with caplog.at_level(logging.INFO, logger="dmad_jax.data.folder"):
    src = FolderSource(tmp_path, "train", image_size=8, channels=1)
  note = [r.getMessage() for r in caplog.records if "sizes" in r.getMessage()]
  assert len(note) == 1 and note[0].startswith(
    f"images in {tmp_path / 'train'} come in 2 sizes (8x8: 3, 20x12: 1)"
  )
  assert f"e.g. {good / 'wide.png'} is 20x12" in note[0] and "resized to 8x8" in note[0]
  # Every record has the configured size; a constant image stays constant through the resize.
  rec = src[3]
  assert rec["image"].shape == (8, 8, 1)
  np.testing.assert_allclose(rec["image"], 200 / 127.5 - 1, atol=1e-6)


def test_one_size_other_than_image_size_is_an_info_note(tmp_path, caplog):
  good = _tree(tmp_path)
  for i in range(2):
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(good / f"{i}.png")
  with caplog.at_level(logging.INFO, logger="dmad_jax.data.folder"):
    FolderSource(tmp_path, "train", image_size=8, channels=1)
  assert f"images in {tmp_path / 'train'} are 16x16; resized to 8x8" in caplog.text
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_gray_rgba_and_sixteen_bit_pngs_load_to_the_right_values(tmp_path):
  good = _tree(tmp_path)
  wide = np.array([[0, 257, 32896, 65535]] * 4, np.uint16)  # 16-bit: 0, 1, 128, 255 in 8 bits
  Image.fromarray(wide).save(good / "a_16bit.png")
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 255, 0, 51, 7  # alpha is dropped
  Image.fromarray(rgba).save(good / "b_rgba.png")
  gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 17
  Image.fromarray(gray).save(good / "c_gray.png")
  with Image.open(good / "a_16bit.png") as img:
    assert img.mode.startswith("I;16")  # the file really is 16-bit

  src = FolderSource(tmp_path, "train", image_size=4, channels=3)
  sixteen, colour, grey = (src[i]["image"] for i in range(3))
  # 16-bit values are scaled by 255/65535 (full range), not clipped at 255.
  np.testing.assert_allclose(sixteen[0, :, 0], np.array([0, 1, 128, 255]) / 127.5 - 1, atol=1e-6)
  assert np.all(sixteen[..., 0] == sixteen[..., 2])  # gray replicated to RGB
  np.testing.assert_allclose(colour[0, 0], np.array([255, 0, 51]) / 127.5 - 1, atol=1e-6)
  np.testing.assert_allclose(grey[..., 1], gray / 127.5 - 1, atol=1e-6)
