"""Tests of dmad_jax.data.images: decoding, mode handling, resizing and error reporting."""

import numpy as np
import pytest
from PIL import Image

from dmad_jax.data import images


def _gradient(h=12, w=10, c=3, seed=0):
  """A deterministic uint8 test image with varied values."""
  rng = np.random.default_rng(seed)
  shape = (h, w) if c == 1 else (h, w, c)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def test_to_unit_range_maps_uint8_endpoints():
  out = images.to_unit_range(np.array([0, 255, 127], np.uint8))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [-1.0, 1.0, 127 / 127.5 - 1], rtol=0, atol=1e-7)


def test_to_unit_range_rejects_float():
  with pytest.raises(TypeError, match="uint8"):
    images.to_unit_range(np.zeros(3, np.float32))


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff", ".webp"])
def test_lossless_rgb_round_trip(tmp_path, ext):
  rgb = _gradient()
  path = tmp_path / f"x{ext}"
  # Lossless WebP needs the flag; the other formats are lossless by default.
  Image.fromarray(rgb).save(path, **({"lossless": True} if ext == ".webp" else {}))
  out = images.load_image(path, image_size=rgb.shape[0], channels=3)
  assert out.dtype == np.uint8
  # Non-square inputs are resized to square, so compare against PIL's own bilinear resize.
  want = np.asarray(Image.fromarray(rgb).resize((12, 12), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(out, want)


def test_gray_is_replicated_and_rgb_becomes_luma(tmp_path):
  gray = _gradient(8, 8, 1)
  Image.fromarray(gray).save(tmp_path / "g.png")
  out3 = images.load_image(tmp_path / "g.png", image_size=8, channels=3)
  assert out3.shape == (8, 8, 3)
  for k in range(3):
    np.testing.assert_array_equal(out3[..., k], gray)
  rgb = _gradient(8, 8, 3)
  Image.fromarray(rgb).save(tmp_path / "c.png")
  out1 = images.load_image(tmp_path / "c.png", image_size=8, channels=1)
  assert out1.shape == (8, 8, 1)
  np.testing.assert_array_equal(out1[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))


def test_rgba_drops_alpha_and_palette_is_expanded(tmp_path):
  rgba = _gradient(6, 6, 4)
  Image.fromarray(rgba).save(tmp_path / "a.png")
  out = images.load_image(tmp_path / "a.png", image_size=6, channels=3)
  np.testing.assert_array_equal(out, rgba[..., :3])
  pal = Image.fromarray(_gradient(6, 6, 3)).convert("P")
  pal.info["transparency"] = 0
  pal.save(tmp_path / "p.png", transparency=0)
  out = images.load_image(tmp_path / "p.png", image_size=6, channels=3)
  np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))


def test_sixteen_bit_gray_is_divided_by_257(tmp_path):
  values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 4) * 257
  values[0, 0] = 65535
  Image.fromarray(values).save(tmp_path / "d.png")
  with Image.open(tmp_path / "d.png") as img:
    assert img.mode.startswith("I;16")  # The file really is 16-bit.
  out = images.load_image(tmp_path / "d.png", image_size=8, channels=1)
  want = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
  want[0, 0] = 255
  np.testing.assert_array_equal(out[..., 0], want)


def test_thirty_two_bit_tiff_with_sixteen_bit_values(tmp_path):
  values = (np.arange(16, dtype=np.int32).reshape(4, 4) * 16) * 257
  Image.fromarray(values).save(tmp_path / "i.tif")
  out = images.load_image(tmp_path / "i.tif", image_size=4, channels=1)
  np.testing.assert_array_equal(out[..., 0], np.arange(16).reshape(4, 4) * 16)


def test_jpeg_and_resize(tmp_path):
  rgb = np.full((20, 30, 3), (200, 100, 50), np.uint8)
  Image.fromarray(rgb).save(tmp_path / "j.jpg", quality=95)
  out = images.load_image(tmp_path / "j.jpg", image_size=7, channels=3)
  assert out.shape == (7, 7, 3)
  np.testing.assert_allclose(out.reshape(-1, 3).mean(0), (200, 100, 50), atol=3)


def test_truncated_png_raises_with_path(tmp_path):
  Image.fromarray(_gradient(32, 32, 3)).save(tmp_path / "ok.png")
  data = (tmp_path / "ok.png").read_bytes()
  bad = tmp_path / "bad.png"
  bad.write_bytes(data[: len(data) // 2])
  with pytest.raises(images.ImageReadError, match="bad.png") as info:
    images.load_image(bad, image_size=32, channels=3)
  assert str(bad) in str(info.value) and info.value.path == str(bad)
  with pytest.raises(images.ImageReadError, match="bad.png"):
    images.verify_image(bad, image_size=32, channels=3)
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_garbage_and_missing_files_raise(tmp_path, content):
  path = tmp_path / "junk.png"
  path.write_bytes(content)
  with pytest.raises(images.ImageReadError, match="junk.png"):
    images.load_image(path, image_size=4, channels=1)
  with pytest.raises(images.ImageReadError, match="missing.png"):
    images.load_image(tmp_path / "missing.png", image_size=4, channels=1)


def test_invalid_options():
  with pytest.raises(ValueError, match="channels"):
    images.prepare_array(np.zeros((4, 4), np.uint8), image_size=4, channels=2)
  with pytest.raises(ValueError, match="image_size"):
    images.prepare_array(np.zeros((4, 4), np.uint8), image_size=0, channels=1)


@pytest.mark.parametrize("shape", [(5, 6), (5, 6, 1), (5, 6, 3), (5, 6, 4)])
@pytest.mark.parametrize("channels", [1, 3])
def test_prepare_array_shapes(shape, channels):
  out = images.prepare_array(np.zeros(shape, np.uint8), image_size=9, channels=channels)
  assert out.shape == (9, 9, channels) and out.dtype == np.uint8


def test_cv2_bilinear_reads_pixel_centres_without_antialiasing(tmp_path):
  """OpenCV's INTER_LINEAR by its definition: output i samples the input at (i + 0.5) * scale
  - 0.5. A factor-4 downscale therefore averages input pixels 4i + 1 and 4i + 2 only (PIL's
  antialiased filter mixes in the others); a factor-2 upscale of [a, b] gives a, .75a + .25b,
  .25a + .75b, b; equal sizes are unchanged."""
  stripes = np.tile(np.array([0, 200, 200, 0], np.uint8), 8)  # period 4
  img = np.tile(stripes, (32, 1))
  small = images.resize_bilinear_cv2(img, 8)
  np.testing.assert_array_equal(small, np.full((8, 8), 200, np.uint8))
  Image.fromarray(img).save(tmp_path / "s.png")
  cv = images.load_image(tmp_path / "s.png", image_size=8, channels=1, resize="cv2_bilinear")
  pil = images.load_image(tmp_path / "s.png", image_size=8, channels=1)
  np.testing.assert_array_equal(cv[..., 0], small)
  assert np.abs(pil.astype(int) - 100).max() < 30  # PIL averages the whole period
  up = images.resize_bilinear_cv2(np.array([[0, 100]] * 2, np.uint8), 4)
  np.testing.assert_array_equal(up[0], [0, 25, 75, 100])
  rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  np.testing.assert_array_equal(images.resize_bilinear_cv2(rgb, 16), rgb)
  with pytest.raises(ValueError, match="resize must be one of"):
    images.load_image(tmp_path / "s.png", image_size=8, channels=1, resize="nearest")
