"""Image decoding and normalisation shared by all data sources.

Every source hands images to the model as float32 ``(H, W, C)`` arrays in ``[-1, 1]``. The steps
to get there live here so that folder, digits and TFDS images go through the same conversions:

1. decode with PIL (:func:`load_image`) or take a decoded uint8 array (:func:`prepare_array`);
2. reduce any PIL mode to 8-bit gray (``L``) or ``RGB``; 16-bit and 32-bit gray are rescaled;
3. convert to the configured channel count (gray replicated to RGB, RGB to ITU-R 601 luma);
4. resize to ``(image_size, image_size)`` when the size differs: PIL's bilinear filter
   (``resize="pil_bilinear"``, antialiased when downscaling) or OpenCV's ``INTER_LINEAR``
   definition (``"cv2_bilinear"``: the released video code's; no antialiasing);
5. scale uint8 to ``[-1, 1]`` with :func:`to_unit_range`.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# Lower-case suffixes a folder source accepts; matched case-insensitively.
IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class ImageReadError(ValueError):
  """An image file could not be opened or decoded.

  Attributes:
    path: the offending file.
    reason: what went wrong, as reported by PIL or the conversion code.
  """

  def __init__(self, path: str | os.PathLike, reason: str):
    """Builds the error.

    Args:
      path: the file that could not be read.
      reason: a short description of the failure.
    """
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f"cannot read image {self.path!r}: {reason}")


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """Maps uint8 pixel values to float32 in ``[-1, 1]``.

  Args:
    image: array of uint8 values in ``[0, 255]`` (any shape).

  Returns:
    ``image / 127.5 - 1`` as float32, same shape.

  Raises:
    TypeError: if ``image`` is not uint8 (other dtypes have no agreed full-scale value).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f"to_unit_range expects a uint8 array, got dtype {image.dtype}")
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def check_image_options(image_size: int, channels: int) -> None:
  """Validates the output size and channel count shared by all sources.

  Args:
    image_size: output height and width; must be a positive int.
    channels: 1 (gray) or 3 (RGB).

  Raises:
    ValueError: for a non-positive size or a channel count other than 1 or 3.
  """
  if int(image_size) < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def _wide_gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
  """Rescales a 16-bit / 32-bit integer or float gray image to uint8.

  Args:
    values: the decoded pixel values.
    mode: the PIL mode they came from (``I;16*``, ``I`` or ``F``).

  Returns:
    uint8 array of the same shape.
  """
  values = values.astype(np.float64)
  if mode.startswith("I;16"):
    # The file declares a 16-bit range, so map 0..65535 to 0..255 exactly (65535 / 257 = 255)
    # instead of stretching each image by its own maximum, which would change the brightness
    # of every image differently and look like an anomaly.
    scaled = values / 257.0
  else:
    top = float(values.max()) if values.size else 0.0
    if mode == "F" and top <= 1.0:
      # Float images stored in [0, 1].
      scaled = values * 255.0
    elif top <= 255.0:
      # 32-bit container holding 8-bit data (e.g. some TIFF writers).
      scaled = values
    elif top <= 65535.0:
      # Older Pillow opened 16-bit PNGs as mode "I": keep the fixed 16-bit scaling.
      scaled = values / 257.0
    else:
      # No known full-scale value: the per-image maximum is the only reference left.
      scaled = values * (255.0 / top)
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_l_or_rgb(img: Image.Image) -> Image.Image:
  """Reduces any PIL mode to 8-bit ``L`` (gray) or ``RGB``; alpha is dropped, not composited."""
  mode = img.mode
  if mode in ("L", "RGB"):
    return img
  if mode.startswith("I") or mode == "F":
    # PIL's own I;16 -> L conversion clips at 255 instead of rescaling, so do it by hand.
    return Image.fromarray(_wide_gray_to_uint8(np.asarray(img), mode), mode="L")
  if mode in ("1", "LA", "La"):
    return img.convert("L")
  if mode == "P":
    # Palettes may carry transparency; going through RGBA avoids PIL's transparency warning and
    # the alpha is then dropped like for any RGBA image.
    has_alpha = "transparency" in img.info or img.palette.mode == "RGBA"
    return img.convert("RGBA").convert("RGB") if has_alpha else img.convert("RGB")
  if mode == "PA":
    return img.convert("RGBA").convert("RGB")
  # RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV, ...
  return img.convert("RGB")


RESIZE_METHODS = ("pil_bilinear", "cv2_bilinear")


def _bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """OpenCV INTER_LINEAR's sampling along one axis: output i reads the input at
  (i + 0.5) * n_in / n_out - 0.5 (pixel centres), clamped to the border: (lower index, upper
  index, weight of the upper one)."""
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, src - lo


def resize_bilinear_cv2(image: np.ndarray, size: int) -> np.ndarray:
  """``cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)`` for uint8 (H, W[, C])
  images, by its definition: each output pixel interpolates the two nearest input pixel centres
  along each axis, with no antialiasing when downscaling (a factor-4 downscale reads 2 of every
  4 pixels). Computed in float64 and rounded; OpenCV's 11-bit fixed-point weights can round
  differently by one gray level."""
  x = np.asarray(image, np.float64)
  extra = (1,) * (x.ndim - 2)  # the channel axis, when there is one
  lo, hi, w = _bilinear_weights(x.shape[0], size)
  x = x[lo] * (1 - w).reshape(-1, 1, *extra) + x[hi] * w.reshape(-1, 1, *extra)
  lo, hi, w = _bilinear_weights(x.shape[1], size)
  x = x[:, lo] * (1 - w).reshape(1, -1, *extra) + x[:, hi] * w.reshape(1, -1, *extra)
  return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _finish(
  img: Image.Image, image_size: int, channels: int, resize: str = "pil_bilinear"
) -> np.ndarray:
  """Converts an ``L``/``RGB`` PIL image to the channel count and size; returns uint8 HWC."""
  if channels == 1 and img.mode != "L":
    img = img.convert("L")
  if resize not in RESIZE_METHODS:
    raise ValueError(f"resize must be one of {RESIZE_METHODS}, got {resize!r}")
  if img.size != (image_size, image_size) and resize == "cv2_bilinear":
    img = Image.fromarray(resize_bilinear_cv2(np.asarray(img), image_size), mode=img.mode)
  if img.size != (image_size, image_size):
    # Resizing in 8-bit gray/RGB keeps the same filter for every source. PIL's bilinear filter
    # uses pixel centres (no align-corners) and widens its support when downscaling, so it also
    # antialiases.
    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
  arr = np.asarray(img, dtype=np.uint8)
  if arr.ndim == 2:
    arr = arr[:, :, None]
  if channels == 3 and arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  return np.ascontiguousarray(arr)


def prepare_array(image: np.ndarray, *, image_size: int, channels: int) -> np.ndarray:
  """Converts a decoded uint8 image to the configured size and channel count.

  Args:
    image: uint8 array of shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``
      (alpha dropped).
    image_size: output height and width.
    channels: 1 (gray) or 3 (RGB).

  Returns:
    uint8 array of shape ``(image_size, image_size, channels)``.

  Raises:
    ValueError: for an unsupported shape, dtype, size or channel count.
  """
  check_image_options(image_size, channels)
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"prepare_array expects uint8 pixels, got dtype {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[:, :, 0]
  if image.ndim == 3 and image.shape[-1] == 4:
    image = image[:, :, :3]
  if image.ndim == 2:
    img = Image.fromarray(np.ascontiguousarray(image), mode="L")
  elif image.ndim == 3 and image.shape[-1] == 3:
    img = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
  else:
    raise ValueError(f"expected an (H, W[, 1|3|4]) image, got shape {image.shape}")
  return _finish(img, int(image_size), channels)


def load_image(
  path: str | os.PathLike, *, image_size: int, channels: int, resize: str = "pil_bilinear"
) -> np.ndarray:
  """Reads an image file into a uint8 ``(image_size, image_size, channels)`` array.

  Handles every format PIL decodes (png, jpg/jpeg, bmp, tif/tiff, webp, ...) and the modes gray,
  RGB, RGBA (alpha dropped), palette and 16-bit gray (``I;16``: divided by 257; ``I``/``F``: see
  :func:`_wide_gray_to_uint8`). Gray images are replicated to 3 channels when ``channels == 3``
  and colour images converted to luma when ``channels == 1``. Images are resized bilinearly to
  ``(image_size, image_size)`` when their size differs (the aspect ratio is not kept).

  Args:
    path: image file.
    image_size: output height and width.
    channels: 1 (gray) or 3 (RGB).
    resize: "pil_bilinear" (antialiased) or "cv2_bilinear" (:func:`resize_bilinear_cv2`).

  Returns:
    uint8 array of shape ``(image_size, image_size, channels)``; pass it through
    :func:`to_unit_range` to get model inputs.

  Raises:
    ImageReadError: if the file is missing, truncated, corrupt or not an image; the message
      names the file and the reason.
    ValueError: for an invalid ``image_size`` or ``channels``.
  """
  check_image_options(image_size, channels)
  try:
    with Image.open(path) as img:
      img.load()
      img = _to_l_or_rgb(img)
      return _finish(img, int(image_size), channels, resize)
  # PIL plugins raise many unrelated types for bad input (OSError, SyntaxError, struct.error,
  # IndexError, ...); all of them mean "this file is unusable" to the caller.
  except Exception as err:
    raise ImageReadError(path, f"{type(err).__name__}: {err}") from err


def verify_image(path: str | os.PathLike, *, image_size: int, channels: int) -> None:
  """Checks that a file is a readable image, decoding it fully once.

  PIL's ``verify()`` checks chunk checksums that a plain decode may skip; it leaves the file
  unusable, so the image is then decoded again through :func:`load_image`, which also exercises
  the mode conversion and resize the training loop will use.

  Args:
    path: image file.
    image_size: output height and width used for the trial decode.
    channels: 1 or 3, used for the trial decode.

  Raises:
    ImageReadError: if the file is not a readable image.
  """
  try:
    with Image.open(path) as img:
      img.verify()
  except Exception as err:  # Same breadth as in load_image, for the same reason.
    raise ImageReadError(path, f"{type(err).__name__}: {err}") from err
  load_image(path, image_size=image_size, channels=channels)
