"""DMAD's background templates: per-pixel estimates of a video's static background.

:func:`estimate_template` is DMAD's ``gen_bkg`` (the mode of each pixel's smoothed histogram) or a
per-pixel median; :func:`template_bank` estimates every template of a video source's bank (one
template, one per scene or one per video, see :func:`dmad_jax.data.video.video_sources`),
:func:`video_templates` one per video, and :func:`image_template` reads an image file (such as
DMAD's ``bkg_avenue.jpg``) as a template.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import scipy.ndimage

from dmad_jax.data.images import load_image, to_unit_range

if TYPE_CHECKING:
  from dmad_jax.data.video import VideoFrameSource

# OpenCV's getGaussianKernel(13, 0) rule, which DMAD's gen_bkg uses to smooth the histograms.
HIST_KERNEL_SIZE = 13
HIST_KERNEL_SIGMA = 0.3 * ((HIST_KERNEL_SIZE - 1) / 2 - 1) + 0.8  # = 2.3


def _hist_kernel() -> np.ndarray:
  """The normalised 13-tap Gaussian (sigma 2.3) that smooths the per-pixel histograms."""
  x = np.arange(HIST_KERNEL_SIZE, dtype=np.float64) - (HIST_KERNEL_SIZE - 1) / 2
  kernel = np.exp(-(x**2) / (2 * HIST_KERNEL_SIGMA**2))
  return kernel / kernel.sum()


def estimate_template(frames_uint8: np.ndarray, *, method: str = "hist_mode") -> np.ndarray:
  """Background template of one video from its gray frames.

  ``"hist_mode"`` is DMAD's ``gen_bkg``: per pixel, the 256-bin histogram of its values over all
  frames is smoothed with a 13-tap Gaussian (sigma 2.3, zero padding beyond 0 and 255) and the
  most frequent value is kept, so passing objects do not blur the background as a mean would.
  ``"median"`` is the per-pixel median.

  Args:
    frames_uint8: uint8 ``(T, H, W)`` gray frames.
    method: ``"hist_mode"`` or ``"median"``.

  Returns:
    float32 ``(H, W)`` template in ``[-1, 1]`` (``value / 127.5 - 1``).

  Raises:
    ValueError: for an unknown method or frames that are not uint8 ``(T, H, W)`` with T >= 1.
  """
  frames = np.asarray(frames_uint8)
  if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[0] == 0:
    raise ValueError(
      f"expected uint8 (T, H, W) frames with T >= 1, got {frames.dtype} {frames.shape}"
    )
  _, h, w = frames.shape
  if method == "median":
    value = np.median(frames, axis=0)
  elif method == "hist_mode":
    pixels = h * w
    offsets = np.arange(pixels, dtype=np.int64) * 256
    hist = np.zeros(pixels * 256, np.int64)
    # One bincount over (pixel, value) pairs builds every pixel's histogram at once; chunks of
    # frames bound the int64 index array on long videos.
    for chunk in range(0, frames.shape[0], 64):
      flat = frames[chunk : chunk + 64].reshape(-1, pixels)
      hist += np.bincount((flat + offsets).reshape(-1), minlength=pixels * 256)
    smooth = scipy.ndimage.convolve1d(
      hist.reshape(pixels, 256).astype(np.float64), _hist_kernel(), axis=1, mode="constant"
    )
    value = np.argmax(smooth, axis=1).reshape(h, w)
  else:
    raise ValueError(f"method must be 'hist_mode' or 'median', got {method!r}")
  return (np.asarray(value, np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


def video_templates(
  source: VideoFrameSource, *, method: str = "hist_mode", max_frames: int | None = None
) -> np.ndarray:
  """One background template per video of a source (DMAD's ShanghaiTech per-scene bank).

  Frames are read as luminance at the source's size whatever its ``gray`` setting, and the
  template is repeated to 3 channels like the frames the model sees.

  Args:
    source: a :class:`dmad_jax.data.video.VideoFrameSource`.
    method: see :func:`estimate_template`.
    max_frames: use at most this many frames per video, evenly spaced over it (all when None).

  Returns:
    float32 ``(num_videos, S, S, 3)`` in ``[-1, 1]``, in the source's video order.

  Raises:
    ValueError: for an unknown method or ``max_frames < 1``.
  """
  if max_frames is not None and int(max_frames) < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}")
  size = source.image_shape[0]
  out = np.empty((len(source.videos), size, size, 3), np.float32)
  for v, paths in enumerate(source.frame_paths):
    if max_frames is not None and len(paths) > int(max_frames):
      picks = np.linspace(0, len(paths) - 1, int(max_frames)).round().astype(int)
      paths = [paths[i] for i in picks]
    frames = np.stack([load_image(p, image_size=size, channels=1)[:, :, 0] for p in paths])
    out[v] = estimate_template(frames, method=method)[:, :, None]
  return out


def template_bank(
  source: VideoFrameSource, *, method: str = "hist_mode", max_frames: int | None = None
) -> np.ndarray:
  """Estimates every background template of a source's bank (see
  :func:`dmad_jax.data.video.video_sources`).

  Each template is :func:`estimate_template` of the gray frames in
  ``source.template_frames[i]`` (at most ``max_frames`` of them, evenly spaced), repeated to 3
  channels like the frames the model sees.

  Args:
    source: a :class:`dmad_jax.data.video.VideoFrameSource`.
    method: see :func:`estimate_template`.
    max_frames: frames used per template (all when None).

  Returns:
    float32 ``(num_templates, S, S, 3)`` in ``[-1, 1]``.

  Raises:
    ValueError: for an unknown method or ``max_frames < 1``.
  """
  if max_frames is not None and int(max_frames) < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}")
  size = source.image_shape[0]
  out = np.empty((source.num_templates, size, size, 3), np.float32)
  for t, paths in enumerate(source.template_frames):
    if max_frames is not None and len(paths) > int(max_frames):
      picks = np.linspace(0, len(paths) - 1, int(max_frames)).round().astype(int)
      paths = [paths[i] for i in picks]
    frames = np.stack([load_image(p, image_size=size, channels=1)[:, :, 0] for p in paths])
    out[t] = estimate_template(frames, method=method)[:, :, None]
  return out


def image_template(path: str | os.PathLike, source) -> np.ndarray:
  """An image file as a template for ``source``'s records: read at the source's image size,
  float32 (H, W, C) in [-1, 1]; a source that reads gray frames (``source.gray``) and gives 3
  channels gets the file read as gray and repeated to 3 channels (as DMAD reads bkg_avenue.jpg)."""
  h, w, c = source.image_shape
  if getattr(source, "gray", False) and c == 3:
    img = np.repeat(load_image(path, image_size=h, channels=1), 3, axis=-1)
  else:
    img = load_image(path, image_size=h, channels=c)
  return to_unit_range(img)
