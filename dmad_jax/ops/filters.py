"""Fixed (parameter-free) image filters used by DMAD's losses and anomaly scores.

Every function here is pure JAX (no Flax), works under `jax.jit`, `jax.vmap` and `jax.grad`, and
takes NHWC images. Filter taps and padding index maps are built in NumPy from static Python
arguments (kernel sizes, sigma, image sizes), so under `jit` they become compile-time constants and
a call compiles once per input shape.

The ops reproduce these pieces of the official PyTorch release (NCHW there):

- `box_filter_max`: `Test_Loss`, the box-averaged maximum used for the per-frame test errors.
- `gradient_difference`: `Gradient_Loss`, the per-pixel image-gradient difference map.
- `smoothness_1d` / `smoothness_2d`: `Smooth_Loss`, the zero-sum smoothness penalty on offsets
  (1-D kernels for Ped2, a 2-D kernel for Avenue and ShanghaiTech).
- `gaussian_blur`: `scipy.ndimage.gaussian_filter(..., mode='reflect')`, the sigma = 4 smoothing
  of the PPDM anomaly maps.
- `coord_channels` / `add_coords`: `AddCoords2d`, the 4 block-wise coordinate channels that
  `CoordConv2d` concatenates before its convolution.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
  "add_coords",
  "box_filter_max",
  "coord_channels",
  "gaussian_blur",
  "gradient_difference",
  "smoothness_1d",
  "smoothness_2d",
  "smoothness_kernel_1d",
  "smoothness_kernel_2d",
]

# The filters are reference computations (losses and scores compared with PyTorch), so float32
# convolutions and matmuls must not silently drop to TF32 / bf16 passes on GPU or TPU.
_PRECISION = lax.Precision.HIGHEST
_NHWC = ("NHWC", "HWIO", "NHWC")


def _as_float(x: jax.Array) -> jax.Array:
  """Returns `x` as a JAX array with a floating dtype (integers become float32)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def _check_rank(x: jax.Array, ranks: Sequence[int], name: str, layout: str) -> None:
  if x.ndim not in ranks:
    raise ValueError(f"{name} must have shape {layout}, got shape {x.shape}.")


# ------------------------------------------------------------------------------------------------
# Test_Loss: box-averaged maximum.
# ------------------------------------------------------------------------------------------------


def box_filter_max(
  x: jax.Array, kernel_size: Sequence[int], *, reduce_batch: bool = False
) -> jax.Array:
  """Maximum of the box-averaged, channel-summed absolute value ("Test_Loss").

  Equivalent to the official `Test_Loss(channels=C, ks=(kh, kw))`: take |x|, zero-pad `kh` rows at
  the top and bottom and `kw` columns at the left and right (the full kernel size on each side,
  not `kh // 2`), correlate with a `ones(kh, kw, C, 1) / (kh * kw)` kernel in 'VALID' mode (so the
  channels are SUMMED and the window is averaged), and take the maximum over the resulting
  (H + kh + 1, W + kw + 1) map. Because of the wide zero padding, windows that only partly overlap
  the image count the outside as zeros.

  Args:
    x: (N, H, W, C) input; an (N, H, W) input is treated as C = 1 (the official code feeds the
      vertical offset component this way).
    kernel_size: (kh, kw) window height and width, positive integers.
    reduce_batch: if True, also take the maximum over the batch, as the official code does with
      test batch size 1.

  Returns:
    (N,) per-image maxima, or a scalar if `reduce_batch` is True. The dtype is x's floating dtype.

  Raises:
    ValueError: if `x` is not rank 3 or 4, or `kernel_size` is not two positive integers.
  """
  x = _as_float(x)
  _check_rank(x, (3, 4), "x", "(N, H, W, C) or (N, H, W)")
  if len(kernel_size) != 2 or any(int(k) != k or k < 1 for k in kernel_size):
    raise ValueError(f"kernel_size must be two positive integers, got {kernel_size}.")
  kh, kw = int(kernel_size[0]), int(kernel_size[1])
  # The kernel is constant across channels, so correlating with it equals box-filtering the
  # channel sum; summing first shrinks the windowed work by a factor C.
  s = jnp.abs(x) if x.ndim == 3 else jnp.sum(jnp.abs(x), axis=-1)
  s = jnp.pad(s, ((0, 0), (kh, kh), (kw, kw)))
  # Separable window sums: a (kh, 1) then a (1, kw) reduce_window. Measured on 2 CPU cores,
  # 8 x 256 x 256 x 3 input, kernel 42 x 31: 5.7 ms forward / 10.6 ms with grad, vs 171 / 377 ms
  # for one 2-D reduce_window (XLA sums each window naively, O(kh * kw) per pixel), 182 / 651 ms
  # for a conv, and 6.6 / 15.4 ms for a separable cumulative-sum box filter. The cumulative-sum
  # variant also loses ~3x more float32 precision (differences of large running sums).
  s = lax.reduce_window(s, 0.0, lax.add, (1, kh, 1), (1, 1, 1), "VALID")
  s = lax.reduce_window(s, 0.0, lax.add, (1, 1, kw), (1, 1, 1), "VALID")
  # Divide after the max: (kh * kw) > 0, so the argmax is unchanged and one division is enough.
  out = jnp.max(s, axis=(1, 2)) / (kh * kw)
  return jnp.max(out) if reduce_batch else out


# ------------------------------------------------------------------------------------------------
# Gradient_Loss: image-gradient difference.
# ------------------------------------------------------------------------------------------------


def _backward_difference(s: jax.Array, axis: int) -> jax.Array:
  """s[i] - s[i - 1] along `axis`, with s[-1] = 0 (zero pad before the first element)."""
  shifted = lax.slice_in_dim(s, 0, s.shape[axis] - 1, axis=axis)
  pad = [(0, 0)] * s.ndim
  pad[axis] = (1, 0)
  return s - jnp.pad(shifted, pad)


def gradient_difference(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-pixel gradient difference of two images ("Gradient_Loss" map).

  The official loss zero-pads one column on the LEFT (one row on the TOP) and correlates with the
  filter [-1, 1] replicated over all C input channels with one output channel. For the
  channel sum s = sum_c x[..., c] this gives the backward difference

    dx(x)[h, w] = s[h, w] - s[h, w - 1],   dy(x)[h, w] = s[h, w] - s[h - 1, w],

  with s[h, -1] = s[-1, w] = 0, so the first column (row) keeps the raw channel sum. The result is
  |dx(x) - dx(y)| + |dy(x) - dy(y)| (symmetric in x and y). Training takes its mean; the Ped2
  score takes `box_filter_max(., (16, 14))` of it.

  Args:
    x: (N, H, W, C) images, e.g. the target frames.
    y: (N, H, W, C) images of the same shape, e.g. the predictions.

  Returns:
    (N, H, W, 1) map of non-negative gradient differences.

  Raises:
    ValueError: if `x` is not rank 4 or the shapes of `x` and `y` differ.
  """
  x, y = _as_float(x), _as_float(y)
  _check_rank(x, (4,), "x", "(N, H, W, C)")
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}.")
  # Differentiate each image before subtracting (as the official code does) rather than the
  # difference of the images: it is the same linear map, but keeps float32 rounding identical in
  # structure to the reference.
  sx = jnp.sum(x, axis=-1, keepdims=True)
  sy = jnp.sum(y, axis=-1, keepdims=True)
  diff_x = jnp.abs(_backward_difference(sx, axis=2) - _backward_difference(sy, axis=2))
  diff_y = jnp.abs(_backward_difference(sx, axis=1) - _backward_difference(sy, axis=1))
  return diff_x + diff_y


# ------------------------------------------------------------------------------------------------
# Smooth_Loss: zero-sum smoothness filters on offset fields.
# ------------------------------------------------------------------------------------------------


def _check_smoothness_size(ks: int) -> int:
  if int(ks) != ks or ks < 3 or ks % 2 == 0:
    raise ValueError(f"Smoothness kernel size must be an odd integer >= 3, got {ks}.")
  return int(ks)


def smoothness_kernel_1d(ks: int) -> np.ndarray:
  """The 1-D zero-sum smoothness kernel of the official `Smooth_Loss` (Ped2 variant).

  Args:
    ks: kernel length, an odd integer >= 3 (the official code uses 7 and 3).

  Returns:
    (ks,) float32 NumPy array: 1 at the centre, -1 / (ks - 1) elsewhere. NumPy, not JAX, so it is
    a compile-time constant wherever it is used.

  Raises:
    ValueError: if `ks` is not an odd integer >= 3 (an even kernel has no centre tap).
  """
  ks = _check_smoothness_size(ks)
  k = np.full((ks,), -1.0 / (ks - 1), dtype=np.float32)
  k[ks // 2] = 1.0
  return k


def smoothness_kernel_2d(ks: int) -> np.ndarray:
  """The 2-D zero-sum smoothness kernel of the official `Smooth_Loss` (Avenue/Shanghai variant).

  Args:
    ks: kernel side, an odd integer >= 3.

  Returns:
    (ks, ks) float32 NumPy array: 1 at the centre, -1 / (ks**2 - 1) elsewhere.

  Raises:
    ValueError: if `ks` is not an odd integer >= 3.
  """
  ks = _check_smoothness_size(ks)
  k = np.full((ks, ks), -1.0 / (ks * ks - 1), dtype=np.float32)
  k[ks // 2, ks // 2] = 1.0
  return k


def _correlate_channel_sum(o: jax.Array, kernel: np.ndarray) -> jax.Array:
  """Zero-padded 'same' correlation of the channel sum of o (N, H, W, C) with a 2-D kernel."""
  kh, kw = kernel.shape
  # The official weight repeats the same taps over the C input channels with one output channel,
  # so the correlation equals that of the channel sum.
  s = jnp.sum(o, axis=-1, keepdims=True)
  k = jnp.asarray(kernel, dtype=s.dtype)[:, :, None, None]
  return lax.conv_general_dilated(
    s,
    k,
    window_strides=(1, 1),
    padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
    dimension_numbers=_NHWC,
    precision=_PRECISION,
  )


def smoothness_1d(o: jax.Array, ks: int, *, reduce: bool = True) -> jax.Array:
  """Smoothness penalty with 1-D zero-sum kernels along x and y (Ped2 "Smooth_Loss").

  The channel-summed field is correlated with `smoothness_kernel_1d(ks)` along W (zero pad ks // 2
  left and right) and along H (zero pad ks // 2 top and bottom); the penalty is |fx| + |fy|.
  The official code uses S7 on the coarse offsets and S3 on the fine ones.

  Args:
    o: (N, H, W, C) offset field; C = 2 (dx, dy) in DMAD. The channels are summed, as in the
      official code.
    ks: kernel length, an odd integer >= 3.
    reduce: if True return the mean over all pixels, else the per-pixel map (needed where the
      loss is re-weighted per pixel, as for ShanghaiTech).

  Returns:
    Scalar mean(|fx| + |fy|) if `reduce`, else the (N, H, W, 1) map |fx| + |fy|.

  Raises:
    ValueError: if `o` is not rank 4 or `ks` is not an odd integer >= 3.
  """
  o = _as_float(o)
  _check_rank(o, (4,), "o", "(N, H, W, C)")
  k = smoothness_kernel_1d(ks)
  fx = _correlate_channel_sum(o, k[None, :])
  fy = _correlate_channel_sum(o, k[:, None])
  out = jnp.abs(fx) + jnp.abs(fy)
  return jnp.mean(out) if reduce else out


def smoothness_2d(o: jax.Array, ks: int, *, reduce: bool = True) -> jax.Array:
  """Smoothness penalty with one 2-D zero-sum kernel (Avenue/ShanghaiTech "Smooth_Loss").

  The channel-summed field is correlated with `smoothness_kernel_2d(ks)` with zero padding ks // 2
  on every side; the penalty is the absolute response.

  Args:
    o: (N, H, W, C) offset field; the channels are summed.
    ks: kernel side, an odd integer >= 3.
    reduce: if True return the mean over all pixels, else the per-pixel map.

  Returns:
    Scalar mean |f| if `reduce`, else the (N, H, W, 1) map |f|.

  Raises:
    ValueError: if `o` is not rank 4 or `ks` is not an odd integer >= 3.
  """
  o = _as_float(o)
  _check_rank(o, (4,), "o", "(N, H, W, C)")
  out = jnp.abs(_correlate_channel_sum(o, smoothness_kernel_2d(ks)))
  return jnp.mean(out) if reduce else out


def gradient_l1(o: jax.Array) -> jax.Array:
  """The papers' smoothness term ||grad O||_1 (DMAD Eq. 8 and Eq. 18), as a mean: per pixel,
  the absolute forward differences along x and along y summed over the field's channels,
  averaged over the pixels that have each difference.

  Args:
    o: (N, H, W, C) offset field.

  Returns:
    Scalar mean |d_x O|_1 + mean |d_y O|_1.
  """
  o = _as_float(o)
  _check_rank(o, (4,), "o", "(N, H, W, C)")
  dx = jnp.sum(jnp.abs(o[:, :, 1:] - o[:, :, :-1]), axis=-1)
  dy = jnp.sum(jnp.abs(o[:, 1:] - o[:, :-1]), axis=-1)
  return jnp.mean(dx) + jnp.mean(dy)


# ------------------------------------------------------------------------------------------------
# Gaussian blur identical to scipy.ndimage.gaussian_filter(mode='reflect').
# ------------------------------------------------------------------------------------------------


def _reflect_indices(n: int, radius: int) -> np.ndarray:
  """Source index of each position -radius .. n + radius - 1 under scipy's 'reflect' mode.

  'reflect' is half-sample symmetric (d c b a | a b c d | d c b a) and periodic with period 2n, so
  folding modulo 2n handles kernels far wider than the signal, where a single `jnp.pad(...,
  mode='symmetric')` could not reflect more than once.
  """
  m = np.mod(np.arange(-radius, n + radius), 2 * n)
  return np.where(m >= n, 2 * n - 1 - m, m)


@functools.lru_cache(maxsize=64)
def _gaussian_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
  """(n, n) float32 matrix A with (A @ v) = scipy's 1-D reflect-mode Gaussian filter of v."""
  radius = int(truncate * sigma + 0.5)
  # Taps exactly as scipy's _gaussian_kernel1d: float64, normalised to sum 1.
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  taps = np.exp(-0.5 / (sigma * sigma) * t * t)
  taps /= taps.sum()
  rows = np.repeat(np.arange(n), 2 * radius + 1)
  # Output i reads padded positions i .. i + 2r, i.e. source indices reflect(i - r .. i + r).
  cols = _reflect_indices(n, radius)[np.arange(n)[:, None] + np.arange(2 * radius + 1)].ravel()
  a = np.zeros((n, n), dtype=np.float64)
  # Several taps can fold onto one source pixel near the border, hence the unbuffered add.
  np.add.at(a, (rows, cols), np.tile(taps, n))
  a = a.astype(np.float32)
  a.setflags(write=False)
  return a


def gaussian_blur(x: jax.Array, sigma: float, *, truncate: float = 4.0) -> jax.Array:
  """Separable Gaussian blur over H and W, matching `scipy.ndimage.gaussian_filter`.

  For every image (and channel) this equals `scipy.ndimage.gaussian_filter(x_i, sigma,
  mode='reflect', truncate=truncate)` up to float32 rounding: radius int(truncate * sigma + 0.5),
  taps exp(-t^2 / (2 sigma^2)) normalised to sum 1, half-sample symmetric reflection at the
  borders, repeated as often as needed when the kernel is wider than the image. PPDM smooths its
  anomaly and deformation maps with sigma = 4.

  Each 1-D pass is one matmul with an (n, n) banded matrix that has the reflection folded in.
  Measured on 2 CPU cores for 8 x 256 x 256 with sigma = 4: 1.7 ms, vs 11.4 ms for a 33-tap
  shifted-slice sum over a reflect-gathered copy (scipy itself: 9 ms). The O(n^2) matrix is
  meant for map sizes up to ~1k pixels per side.

  Args:
    x: (N, H, W) maps or (N, H, W, C) images; only H and W are blurred.
    sigma: standard deviation in pixels (a static Python number, >= 0; 0 returns x unchanged, as
      scipy does).
    truncate: kernel half-width in standard deviations.

  Returns:
    Blurred array with x's shape and floating dtype.

  Raises:
    ValueError: if `x` is not rank 3 or 4, `sigma` is negative or `truncate` is not positive.
  """
  x = _as_float(x)
  _check_rank(x, (3, 4), "x", "(N, H, W) or (N, H, W, C)")
  sigma, truncate = float(sigma), float(truncate)
  if sigma < 0:
    raise ValueError(f"sigma must be >= 0, got {sigma}.")
  if truncate <= 0:
    raise ValueError(f"truncate must be > 0, got {truncate}.")
  if sigma == 0:
    return x
  a_h = jnp.asarray(_gaussian_matrix(x.shape[1], sigma, truncate))
  a_w = jnp.asarray(_gaussian_matrix(x.shape[2], sigma, truncate))
  # Accumulate in at least float32 (a bf16 map would otherwise sum 33+ taps in bf16).
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  y = x.astype(compute_dtype)
  spec_h, spec_w = ("ij,njw...->niw...", "kw,niw...->nik...")
  y = jnp.einsum(spec_h, a_h.astype(compute_dtype), y, precision=_PRECISION)
  y = jnp.einsum(spec_w, a_w.astype(compute_dtype), y, precision=_PRECISION)
  return y.astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# AddCoords2d: block-wise coordinate channels for CoordConv.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def coord_channels(size: int, *, num_blocks: int) -> np.ndarray:
  """The 4 coordinate channels of the official `AddCoords2d` for a square S x S input.

  With block length b = S // fs (fs = `num_blocks`, "feature_size" in the official code) and
  i = 0 .. S - 1:

    coarse(i) = (i // b) / (fs - 1)         (block index, in [0, 1])
    fine(i)   = i / (S - 1) - coarse(i)     (position inside the block, almost constant)
    channel   = 2 * v - 1

  Channel order is [xx, xx_, yy, yy_] = [fine(row), coarse(row), fine(col), coarse(col)]: xx and
  xx_ vary along ROWS (the H axis), yy and yy_ along COLUMNS (the W axis). The values are computed
  in float32 in the same operation order as the PyTorch code, so they are bit-identical to it.

  Special cases: DMAD-PDM uses fs = 32 at every size, so at S = 32 the fine channels are exactly
  -1 and at S = 256 they stay within about -1 +/- 0.055. DMAD-PPDM uses fs = S / 4 (positional
  encoding reduction r = 4). For fs == 1 the official formula divides 0 by 0; here coarse is
  defined as 0 (a single block), so the coarse channels are -1 and fine(i) = i / (S - 1).

  Args:
    size: the side S of the square input, >= 2.
    num_blocks: fs, the number of blocks per side; it must divide S.

  Returns:
    (S, S, 4) float32 NumPy array (read-only, cached), channels last. NumPy rather than JAX so
    that, inside `jit`, the channels are a compile-time constant.

  Raises:
    ValueError: if S < 2, fs < 1, or fs does not divide S.
  """
  if int(size) != size or size < 2:
    raise ValueError(f"size must be an integer >= 2, got {size}.")
  if int(num_blocks) != num_blocks or num_blocks < 1:
    raise ValueError(f"num_blocks must be a positive integer, got {num_blocks}.")
  size, fs = int(size), int(num_blocks)
  if size % fs:
    raise ValueError(f"num_blocks (fs={fs}) must divide the input size (S={size}).")
  f32 = np.float32
  fine = np.arange(size, dtype=f32) / f32(size - 1)
  if fs == 1:
    coarse = np.zeros((size,), dtype=f32)
  else:
    coarse = np.repeat(np.arange(fs, dtype=f32) / f32(fs - 1), size // fs)
  fine = (fine - coarse) * f32(2) - f32(1)
  coarse = coarse * f32(2) - f32(1)
  rows = np.broadcast_to(np.stack([fine, coarse], axis=-1)[:, None, :], (size, size, 2))
  cols = np.broadcast_to(np.stack([fine, coarse], axis=-1)[None, :, :], (size, size, 2))
  out = np.concatenate([rows, cols], axis=-1).astype(f32)
  out.setflags(write=False)
  return out


def add_coords(x: jax.Array, *, num_blocks: int) -> jax.Array:
  """Appends the `coord_channels` of a square input to its channels (official `AddCoords2d`).

  Args:
    x: (N, S, S, C) input.
    num_blocks: fs, blocks per side (32 in DMAD-PDM, S / 4 in DMAD-PPDM); must divide S.

  Returns:
    (N, S, S, C + 4) array: x followed by [xx, xx_, yy, yy_], in x's dtype.

  Raises:
    ValueError: if `x` is not rank 4, is not square, or `num_blocks` does not divide S.
  """
  x = jnp.asarray(x)
  _check_rank(x, (4,), "x", "(N, S, S, C)")
  n, h, w, _ = x.shape
  if h != w:
    raise ValueError(f"add_coords needs a square input, got H={h}, W={w}.")
  coords = jnp.asarray(coord_channels(h, num_blocks=num_blocks), dtype=x.dtype)
  return jnp.concatenate([x, jnp.broadcast_to(coords, (n, h, w, 4))], axis=-1)
