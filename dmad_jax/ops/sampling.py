"""Differentiable image sampling: grid_sample, align-corners resize and deformation warps.

Everything here is NHWC and follows PyTorch's semantics exactly, because DMAD's deformation
pyramids were trained with ``torch.nn.functional.grid_sample`` / ``F.interpolate``:

* ``grid_sample`` equals ``F.grid_sample(x_nchw, grid, mode, padding_mode, align_corners)``
  (transposed to NHWC) in value and in both gradients, including points outside [-1, 1] and the
  boundary conventions of torch's coordinate clipping and reflection.
* ``resize_bilinear`` equals ``F.interpolate(mode="bilinear", align_corners=...)``.
  ``jax.image.resize`` uses half-pixel centres and is *not* the same as ``align_corners=True``.

``grid_sample`` has two formulations with the same float32 arithmetic, agreeing to
summation-order rounding. On CPU, for float32, its forward and backward passes are C++ kernels
called through XLA's FFI (``dmad_jax.ops.cpu_kernels``), one pass over the sampling points each:
XLA:CPU runs the scatter-add below single-threaded and 4-13x slower. Everywhere else (GPU, TPU,
other dtypes, or no C++ compiler) it is pure XLA. Its backward pass is a custom VJP that keeps
only (x, grid): the grid gradient re-gathers the four bilinear
corners inside its reduction, and the image gradient is one flat scatter-add of ``N*Ho*Wo`` rows
of ``C`` values per corner. Corners that fall outside the image get an out-of-range row index, so
they read as zero in the gather (``mode="fill"``) and are dropped by the scatter
(``mode="drop"``): no padded copy of the image is made and no masks are multiplied in.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmad_jax.ops import cpu_kernels

_MODES = ("bilinear", "nearest")
_PADDINGS = ("zeros", "border", "reflection")


# ---------------------------------------------------------------------------------------------
# Grids.
# ---------------------------------------------------------------------------------------------
def identity_grid(
  batch: int, height: int, width: int, *, align_corners: bool = True, dtype=jnp.float32
) -> jax.Array:
  """The sampling grid that makes ``grid_sample`` return its input unchanged.

  With ``align_corners=True`` this is DMAD's base grid: x = linspace(-1, 1, W) varies along
  columns, y = linspace(-1, 1, H) along rows. With ``align_corners=False`` the values are pixel
  centres ``(2 i + 1) / size - 1``.

  Args:
    batch: N.
    height: H.
    width: W.
    align_corners: the convention the grid will be used with.
    dtype: floating dtype of the result.

  Returns:
    (N, H, W, 2) array holding (x, y) per pixel.
  """

  def axis(size):
    if align_corners:
      return jnp.linspace(-1.0, 1.0, size, dtype=dtype)
    return ((2.0 * jnp.arange(size, dtype=dtype) + 1.0) / size - 1.0).astype(dtype)

  gy, gx = jnp.meshgrid(axis(height), axis(width), indexing="ij")
  grid = jnp.stack([gx, gy], axis=-1)
  return jnp.broadcast_to(grid, (batch, height, width, 2))


def clamp_grid(grid: jax.Array, lo: float = -1.0, hi: float = 1.0) -> jax.Array:
  """``torch.clamp`` with torch's gradient: 1 inside [lo, hi] *including* the bounds, else 0.

  ``jnp.clip`` splits the gradient 0.5/0.5 at an exact tie, and ties are common here: a border
  pixel of the identity grid plus a zero offset sits exactly on +-1.
  """
  return jnp.where(grid < lo, lo, jnp.where(grid > hi, hi, grid)).astype(grid.dtype)


# ---------------------------------------------------------------------------------------------
# Coordinate transforms (torch's GridSampler.h, with the derivative of each step).
# ---------------------------------------------------------------------------------------------
def _unnormalize(g, size, align_corners):
  if align_corners:
    return (g + 1.0) * 0.5 * (size - 1), 0.5 * (size - 1)
  return ((g + 1.0) * size - 1.0) * 0.5, 0.5 * size


def _clip(c, size):
  # Torch treats the borders themselves as out of range for the gradient (0 at c <= 0 and at
  # c >= size - 1), which is why this is not jnp.clip.
  hi = size - 1
  inside = (c > 0) & (c < hi)
  out = jnp.where(c <= 0, 0.0, jnp.where(c >= hi, hi, c)).astype(c.dtype)
  return out, inside.astype(c.dtype)


def _reflect(c, twice_low, twice_high):
  if twice_low == twice_high:
    return jnp.zeros_like(c), jnp.zeros_like(c)
  lo = twice_low / 2.0
  span = (twice_high - twice_low) / 2.0
  c = c - lo
  sign = jnp.where(c < 0, -1.0, 1.0).astype(c.dtype)
  c = jnp.abs(c)
  extra = jnp.fmod(c, span)
  flips = jnp.floor(c / span)
  even = jnp.fmod(flips, 2.0) == 0
  out = jnp.where(even, extra + lo, span - extra + lo)
  return out.astype(c.dtype), jnp.where(even, sign, -sign)


def _source_index(g, size, padding_mode, align_corners):
  """Pixel coordinate of normalised grid values, and d(coordinate)/d(grid)."""
  c, scale = _unnormalize(g, size, align_corners)
  mult = jnp.full_like(c, scale)
  if padding_mode == "border":
    c, m = _clip(c, size)
    mult = mult * m
  elif padding_mode == "reflection":
    if align_corners:
      c, m1 = _reflect(c, 0, 2 * (size - 1))
    else:
      c, m1 = _reflect(c, -1, 2 * size - 1)
    c, m2 = _clip(c, size)
    mult = mult * m1 * m2
  return c, mult


# ---------------------------------------------------------------------------------------------
# grid_sample.
# ---------------------------------------------------------------------------------------------
def _corners(x_shape, grid, mode, padding_mode, align_corners):
  """Row indices into each image's x.reshape(H*W, C) and weights, one (N, M) array per corner.

  Corners are (nw, ne, sw, se) for bilinear, a single one for nearest. Out-of-image corners get
  the row index H*W, which is out of range on purpose (see module docstring). Indices are per
  image, and the gathers and scatters below are vmapped over the batch, so that they carry the
  batch as a batching dimension: with a batch sharded over devices they stay local instead of
  all-gathering the whole batch. Corners are kept as separate arrays rather than a stacked
  (N, M, 4) tensor: XLA:CPU handles the broadcasts of a stacked corner axis against C very slowly
  (measured 16 ms vs 0.3 ms at (8, 64, 64, 64)).
  """
  n, h, w, _ = x_shape
  gx = grid[..., 0].reshape(n, -1)
  gy = grid[..., 1].reshape(n, -1)
  ix, mx = _source_index(gx, w, padding_mode, align_corners)
  iy, my = _source_index(gy, h, padding_mode, align_corners)
  oob = h * w

  def row(yi, xi):
    valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    return jnp.where(valid, yi * w + xi, oob)

  if mode == "nearest":
    # std::nearbyint rounds half to even, and so does jnp.round.
    xi = jnp.round(ix).astype(jnp.int32)
    yi = jnp.round(iy).astype(jnp.int32)
    return (row(yi, xi),), (jnp.ones_like(ix),), None
  x0f = jnp.floor(ix)
  y0f = jnp.floor(iy)
  tx = ix - x0f
  ty = iy - y0f
  x0 = x0f.astype(jnp.int32)
  y0 = y0f.astype(jnp.int32)
  rows = (row(y0, x0), row(y0, x0 + 1), row(y0 + 1, x0), row(y0 + 1, x0 + 1))
  # Same products as torch: nw = (x1 - ix)(y1 - iy) etc., with x1 - ix = 1 - tx.
  weights = ((1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty)
  return rows, weights, (tx, ty, mx, my)


def _formulation(cpu_kernel, xla, options, *arrays):
  """``cpu_kernel(*options, *arrays)`` when lowered for CPU with float32 arrays and the kernels
  built, else ``xla(*options, *arrays)`` (see ``cpu_kernels.by_platform``)."""
  xla = functools.partial(xla, *options)

  def cpu(*arrays):
    if all(a.dtype == jnp.float32 for a in arrays) and cpu_kernels.available():
      return cpu_kernel(*options, *arrays)
    return xla(*arrays)

  return cpu_kernels.by_platform(cpu, xla, *arrays)


def _sample_fwd(x, grid, mode, padding_mode, align_corners):
  options = (mode, padding_mode, align_corners)
  return _formulation(_cpu_kernel_fwd, _xla_fwd, options, x, grid)


@functools.cache
def _cpu_kernel_calls(mode, padding_mode, align_corners):
  """(forward, backward) calls of the C++ kernels (dmad_jax/ops/_cpu/grid_sample.cc) for these
  options: per image, so they stay local to each device when the batch is sharded."""
  attrs = dict(
    mode=np.int32(_MODES.index(mode)),
    padding=np.int32(_PADDINGS.index(padding_mode)),
    align_corners=np.int32(bool(align_corners)),
  )

  def fwd(x, grid):
    out = jax.ShapeDtypeStruct(grid.shape[:-1] + x.shape[-1:], x.dtype)
    return jax.ffi.ffi_call(cpu_kernels.target("DmadGridSampleFwd"), out)(x, grid, **attrs)

  def bwd(x, grid, g):
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(grid.shape, grid.dtype))
    return jax.ffi.ffi_call(cpu_kernels.target("DmadGridSampleBwd"), outs)(x, grid, g, **attrs)

  return (
    cpu_kernels.batch_parallel(fwd, "b h w c, b p q t -> b p q c"),
    cpu_kernels.batch_parallel(bwd, "b h w c, b p q t, b p q c -> b h w c, b p q t"),
  )


def _cpu_kernel_fwd(mode, padding_mode, align_corners, x, grid):
  """The samples from the C++ kernel."""
  return _cpu_kernel_calls(mode, padding_mode, bool(align_corners))[0](x, grid)


def _xla_fwd(mode, padding_mode, align_corners, x, grid):
  """The samples in pure XLA: one gather per corner, fused into the weighted sum."""
  n, h, w, c = x.shape
  acc = _accumulation_dtype(x, grid)
  rows, weights, _ = _corners(x.shape, grid.astype(acc), mode, padding_mode, align_corners)
  flat = x.reshape(n, h * w, c)
  # One gather per corner (N, M, C), each fused into the weighted sum; rows outside the image
  # read as zeros.
  out = sum(
    wk[..., None].astype(acc) * _gather(flat, r).astype(acc)
    for r, wk in zip(rows, weights, strict=True)
  )
  return out.astype(x.dtype).reshape(n, grid.shape[1], grid.shape[2], c)


def _accumulation_dtype(x, grid):
  """Coordinates, weights and sums in at least float32 (a bfloat16 grid cannot address the
  pixels of a 256-pixel row, and bfloat16 sums of four corners or of C channels lose digits)."""
  return jnp.promote_types(jnp.promote_types(x.dtype, grid.dtype), jnp.float32)


# Per image (H*W, C) rows; vmapped so the batch is a batching dimension of the gather/scatter.
_gather = jax.vmap(lambda f, r: f.at[r].get(mode="fill", fill_value=0))
_scatter_add = jax.vmap(lambda f, r, u: f.at[r].add(u, mode="drop"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grid_sample(x, grid, mode, padding_mode, align_corners):
  return _sample_fwd(x, grid, mode, padding_mode, align_corners)


def _grid_sample_fwd(x, grid, mode, padding_mode, align_corners):
  # Only the inputs are kept: recomputing the corner indices and weights (elementwise) and the
  # gathers (fused into their reductions) in the backward pass is much cheaper on XLA:CPU than
  # materialising 4 gathered (N, M, C) residuals (measured 21 ms vs 0.3 ms at (8,64,64,64)).
  return _sample_fwd(x, grid, mode, padding_mode, align_corners), (x, grid)


def _grid_sample_bwd(mode, padding_mode, align_corners, residuals, g):
  x, grid = residuals
  options = (mode, padding_mode, align_corners)
  return _formulation(_cpu_kernel_bwd, _xla_bwd, options, x, grid, g)


def _cpu_kernel_bwd(mode, padding_mode, align_corners, x, grid, g):
  """Both gradients from the C++ kernel."""
  return _cpu_kernel_calls(mode, padding_mode, bool(align_corners))[1](x, grid, g)


def _xla_bwd(mode, padding_mode, align_corners, x, grid, g):
  """Both gradients in pure XLA: scatter-adds for the image, fused gathers for the grid."""
  n, h, w, c = x.shape
  acc = _accumulation_dtype(x, grid)
  rows, weights, terms = _corners(x.shape, grid.astype(acc), mode, padding_mode, align_corners)
  g = g.reshape(n, -1, c).astype(acc)
  # d out / d x: each output row is spread onto its source rows with the forward weights; one
  # scatter-add per corner into the same buffer (out-of-image rows are dropped).
  gx = jnp.zeros((n, h * w, c), acc)
  for r, wk in zip(rows, weights, strict=True):
    gx = _scatter_add(gx, r, wk[..., None].astype(acc) * g)
  gx = gx.astype(x.dtype).reshape(x.shape)
  if mode == "nearest":
    return gx, jnp.zeros_like(grid)
  tx, ty, mx, my = terms
  # d out / d(ix, iy) from the corner values (nw, ne, sw, se), then the chain rule through
  # unnormalisation, clipping and reflection (mx, my).
  flat = x.reshape(n, h * w, c)
  v00, v01, v10, v11 = (jnp.sum(_gather(flat, r).astype(acc) * g, axis=-1) for r in rows)
  d_ix = (v01 - v00) * (1 - ty) + (v11 - v10) * ty
  d_iy = (v10 - v00) * (1 - tx) + (v11 - v01) * tx
  ggrid = jnp.stack([d_ix * mx, d_iy * my], -1).reshape(grid.shape).astype(grid.dtype)
  return gx, ggrid


_grid_sample.defvjp(_grid_sample_fwd, _grid_sample_bwd)


def grid_sample(
  x: jax.Array,
  grid: jax.Array,
  *,
  mode: str = "bilinear",
  padding_mode: str = "zeros",
  align_corners: bool = True,
) -> jax.Array:
  """Samples ``x`` at the points of ``grid``, exactly as ``torch.nn.functional.grid_sample``.

  Args:
    x: (N, H, W, C) image or feature map.
    grid: (N, Ho, Wo, 2) sampling points, (x, y) in normalised coordinates: -1 is the left/top
      and +1 the right/bottom edge (pixel centres with ``align_corners=True``, pixel outer
      edges with ``False``). Values outside [-1, 1] are allowed and handled per
      ``padding_mode``.
    mode: "bilinear" or "nearest" (nearest rounds half to even, as torch does; its gradient
      with respect to the grid is zero).
    padding_mode: "zeros", "border" or "reflection".
    align_corners: torch's ``align_corners``. DMAD uses True (the default here, unlike torch).

  Precision: any floating ``x`` and ``grid``; coordinates, bilinear weights, the four-corner
  sums and both gradients' accumulations are computed in at least float32 and the results are
  returned in the inputs' dtypes (a bfloat16 image gives bfloat16 samples).

  Returns:
    (N, Ho, Wo, C) samples, with gradients with respect to ``x`` and ``grid`` equal to torch's.

  Raises:
    ValueError: on an unknown mode or padding, or mismatched shapes.
  """
  x, grid = jnp.asarray(x), jnp.asarray(grid)
  if mode not in _MODES:
    raise ValueError(f"grid_sample: mode must be one of {_MODES}, got {mode!r}")
  if padding_mode not in _PADDINGS:
    raise ValueError(f"grid_sample: padding_mode must be one of {_PADDINGS}, got {padding_mode!r}")
  if x.ndim != 4 or grid.ndim != 4 or grid.shape[-1] != 2 or grid.shape[0] != x.shape[0]:
    raise ValueError(
      f"grid_sample: expected x (N,H,W,C) and grid (N,Ho,Wo,2), got x {x.shape} and grid "
      f"{grid.shape}"
    )
  return _grid_sample(x, grid, mode, padding_mode, bool(align_corners))


# ---------------------------------------------------------------------------------------------
# Resize.
# ---------------------------------------------------------------------------------------------
def _interp_matrix(in_size: int, out_size: int, align_corners: bool, dtype) -> jax.Array:
  """(out, in) matrix of 1-D linear interpolation weights, torch's source-index convention.

  The weights are computed in float32, or in float64 for float64 inputs (as torch does).
  """
  cdt = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
  i = jnp.arange(out_size, dtype=cdt)
  if align_corners:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = i * scale
  else:
    # area_pixel_compute_source_index: half-pixel centres, negative sources clamped to 0.
    src = jnp.maximum((i + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = jax.nn.one_hot(i0, in_size, dtype=cdt) * (1 - lam)[:, None]
  m = m + jax.nn.one_hot(i1, in_size, dtype=cdt) * lam[:, None]
  return m.astype(dtype)


def resize_bilinear(
  x: jax.Array, size: int | Sequence[int], *, align_corners: bool = True
) -> jax.Array:
  """Bilinear resize with ``F.interpolate(mode="bilinear", align_corners=...)`` semantics.

  Implemented as two small dense matmuls with 2-tap interpolation matrices: exact (the other
  taps are zeros), fast on every backend, and its gradient is the transposed matmul.

  Args:
    x: (N, H, W, C).
    size: output (Ho, Wo), or one int for a square output.
    align_corners: torch's ``align_corners`` (DMAD upsamples offsets and anomaly maps with True).

  Returns:
    (N, Ho, Wo, C).
  """
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"resize_bilinear: expected (N,H,W,C), got shape {x.shape}")
  ho, wo = (size, size) if isinstance(size, int) else tuple(size)
  _, h, w, _ = x.shape
  if (ho, wo) == (h, w):
    return x
  my = _interp_matrix(h, ho, align_corners, x.dtype)
  mx = _interp_matrix(w, wo, align_corners, x.dtype)
  hp = jax.lax.Precision.HIGHEST  # keep f32 accuracy on TPU, where the default is bf16 passes
  y = jnp.einsum("oh,nhwc->nowc", my, x, precision=hp)
  return jnp.einsum("pw,nowc->nopc", mx, y, precision=hp)


# ---------------------------------------------------------------------------------------------
# Deformation warps (DMAD's PDM / PPDM).
# ---------------------------------------------------------------------------------------------
def offsets_to_grid(
  offsets: jax.Array, size: int | Sequence[int] | None = None, *, clamp: bool = True
) -> jax.Array:
  """Turns an offset field into a sampling grid, as DMAD's OffsetNet does.

  Args:
    offsets: (N, h, w, 2) offsets in normalised units, channel 0 = dx and 1 = dy.
    size: output (H, W); the offsets are upsampled to it with ``resize_bilinear``
      (align_corners=True). None keeps (h, w).
    clamp: clamp the grid to [-1, 1] (DMAD always does, so zero padding is never sampled).

  Returns:
    (N, H, W, 2) grid = identity + offsets, in at least float32 (bfloat16 offsets are promoted:
    a bfloat16 coordinate near 1 is only 2^-8 precise, a pixel of a 256-pixel row).
  """
  offsets = jnp.asarray(offsets)
  offsets = offsets.astype(jnp.promote_types(offsets.dtype, jnp.float32))
  if size is not None:
    offsets = resize_bilinear(offsets, size, align_corners=True)
  n, h, w, _ = offsets.shape
  grid = identity_grid(n, h, w, dtype=offsets.dtype) + offsets
  return clamp_grid(grid) if clamp else grid


def warp(x: jax.Array, offsets: jax.Array, *, clamp: bool = True) -> jax.Array:
  """Deforms ``x`` by an offset field: bilinear, zero padding, align_corners=True.

  Args:
    x: (N, H, W, C).
    offsets: (N, h, w, 2) in normalised units (dx, dy); upsampled to (H, W) when smaller.
    clamp: clamp the grid to [-1, 1] first (DMAD's convention).

  Returns:
    (N, H, W, C) warped image.
  """
  grid = offsets_to_grid(offsets, x.shape[1:3], clamp=clamp)
  return grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
