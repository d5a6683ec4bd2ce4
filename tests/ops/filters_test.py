"""Tests for dmad_jax.ops.filters against PyTorch / SciPy re-implementations of the official code.

The torch references below are written from the facts in shared/spec/seed_systems.md (NCHW, as
in the official release); inputs are generated NHWC and transposed for torch.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as tF
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from dmad_jax.ops import filters

# ------------------------------------------------------------------------------------------------
# Torch / NumPy references.
# ------------------------------------------------------------------------------------------------


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.permute(0, 2, 3, 1).numpy()


def torch_test_loss_map(x_nhwc: np.ndarray, ks: tuple[int, int]) -> torch.Tensor:
  """Official Test_Loss before its max: pad (kw, kw, kh, kh), ones(1, C, kh, kw)/(kh*kw) conv."""
  kh, kw = ks
  x = _nchw(x_nhwc)
  weight = torch.ones((1, 1, kh, kw), dtype=torch.float32).repeat(1, x.shape[1], 1, 1) / (kh * kw)
  return tF.conv2d(tF.pad(x.abs(), (kw, kw, kh, kh)), weight)


def torch_gradient_loss(gen_nhwc: np.ndarray, gt_nhwc: np.ndarray) -> np.ndarray:
  """Official Gradient_Loss: [-1, 1] filter over all channels, zero pad left / top.

  Runs in the inputs' dtype, so float64 inputs give the exact-arithmetic reference.
  """
  gen, gt = _nchw(gen_nhwc), _nchw(gt_nhwc)
  c = gen.shape[1]
  base = torch.tensor([[-1.0, 1.0]], dtype=gen.dtype)
  filter_x = base.view(1, 1, 1, 2).repeat(1, c, 1, 1)
  filter_y = base.view(1, 1, 2, 1).repeat(1, c, 1, 1)
  gen_dx = tF.conv2d(tF.pad(gen, (1, 0, 0, 0)), filter_x)
  gen_dy = tF.conv2d(tF.pad(gen, (0, 0, 1, 0)), filter_y)
  gt_dx = tF.conv2d(tF.pad(gt, (1, 0, 0, 0)), filter_x)
  gt_dy = tF.conv2d(tF.pad(gt, (0, 0, 1, 0)), filter_y)
  return _nhwc(torch.abs(gt_dx - gen_dx) + torch.abs(gt_dy - gen_dy))


def torch_smooth_1d_map(o_nhwc: np.ndarray, ks: int) -> np.ndarray:
  """Official Ped2 Smooth_Loss before its mean: 1-D zero-sum filters along x and y."""
  o = _nchw(o_nhwc)
  taps = torch.full((1, ks), -1.0 / (ks - 1))
  taps[0, ks // 2] = 1.0
  filter_x = taps.view(1, 1, 1, ks).repeat(1, o.shape[1], 1, 1)
  filter_y = taps.view(1, 1, ks, 1).repeat(1, o.shape[1], 1, 1)
  p = ks // 2
  dx = tF.conv2d(tF.pad(o, (p, p, 0, 0)), filter_x)
  dy = tF.conv2d(tF.pad(o, (0, 0, p, p)), filter_y)
  return _nhwc(dx.abs() + dy.abs())


def torch_smooth_2d_map(o_nhwc: np.ndarray, ks: int) -> np.ndarray:
  """Official Avenue/Shanghai Smooth_Loss before its mean: one 2-D zero-sum filter."""
  o = _nchw(o_nhwc)
  taps = torch.full((ks, ks), -1.0 / (ks * ks - 1))
  taps[ks // 2, ks // 2] = 1.0
  weight = taps.view(1, 1, ks, ks).repeat(1, o.shape[1], 1, 1)
  p = ks // 2
  return _nhwc(tF.conv2d(tF.pad(o, (p, p, p, p)), weight).abs())


def scipy_blur(x: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """scipy.ndimage.gaussian_filter on every (H, W) slice of an (N, H, W[, C]) array."""
  out = np.empty_like(x)
  for n in range(x.shape[0]):
    if x.ndim == 3:
      out[n] = scipy.ndimage.gaussian_filter(x[n], sigma, mode="reflect", truncate=truncate)
    else:
      for c in range(x.shape[-1]):
        out[n, ..., c] = scipy.ndimage.gaussian_filter(
          x[n, ..., c], sigma, mode="reflect", truncate=truncate
        )
  return out


def spec_coords(size: int, fs: int) -> np.ndarray:
  """The spec's AddCoords2d formula as a plain float64 loop, NHWC channels [xx, xx_, yy, yy_]."""
  b = size // fs
  out = np.zeros((size, size, 4))
  for i in range(size):
    coarse = (i // b) / (fs - 1)
    fine = i / (size - 1) - coarse
    out[i, :, 0] = 2 * fine - 1
    out[i, :, 1] = 2 * coarse - 1
    out[:, i, 2] = 2 * fine - 1
    out[:, i, 3] = 2 * coarse - 1
  return out


def _randn(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# box_filter_max (Test_Loss).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("ks", "shape"),
  [
    ((7, 18), (2, 64, 64, 1)),
    ((16, 14), (2, 64, 48, 3)),
    ((42, 31), (2, 256, 256, 3)),
    ((6, 18), (1, 40, 40, 2)),
  ],
)
def test_box_filter_max_matches_torch(ks, shape):
  x = _randn(0, shape)
  ref_map = torch_test_loss_map(x, ks)
  # The wide padding makes the correlation map (H + kh + 1, W + kw + 1), as stated in the spec.
  assert tuple(ref_map.shape[2:]) == (shape[1] + ks[0] + 1, shape[2] + ks[1] + 1)
  ref = ref_map.amax(dim=(1, 2, 3)).numpy()
  out = np.asarray(filters.box_filter_max(x, ks))
  assert out.shape == (shape[0],)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=0)
  batch_max = filters.box_filter_max(x, ks, reduce_batch=True)
  assert batch_max.shape == ()
  np.testing.assert_allclose(batch_max, ref_map.max().item(), rtol=1e-5, atol=0)


def test_box_filter_max_border_windows_count_zeros():
  # A single hot pixel in the corner: the best window still covers it fully, so the max is
  # 1/(kh*kw); with the spec's wide padding no window is clipped to the image.
  x = np.zeros((1, 10, 12, 1), np.float32)
  x[0, 0, 0, 0] = -3.0
  np.testing.assert_allclose(filters.box_filter_max(x, (4, 5)), [3.0 / 20], rtol=1e-6)


def test_box_filter_max_rank3_is_single_channel():
  x = _randn(1, (2, 20, 24))
  np.testing.assert_array_equal(
    filters.box_filter_max(x, (7, 18)), filters.box_filter_max(x[..., None], (7, 18))
  )


@settings(max_examples=15)  # each new shape compiles afresh; 15 keeps this test ~3 s
@given(
  h=st.integers(1, 12),
  w=st.integers(1, 12),
  c=st.integers(1, 3),
  kh=st.integers(1, 9),
  kw=st.integers(1, 9),
  seed=st.integers(0, 2**16),
)
def test_box_filter_max_random_shapes(h, w, c, kh, kw, seed):
  x = _randn(seed, (1, h, w, c))
  ref = torch_test_loss_map(x, (kh, kw)).amax(dim=(1, 2, 3)).numpy()
  np.testing.assert_allclose(filters.box_filter_max(x, (kh, kw)), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ks", [(0, 3), (3,), (2.5, 3)])
def test_box_filter_max_rejects_bad_kernel(ks):
  with pytest.raises(ValueError, match="kernel_size"):
    filters.box_filter_max(np.ones((1, 4, 4, 1), np.float32), ks)


# ------------------------------------------------------------------------------------------------
# gradient_difference (Gradient_Loss).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 32, 40, 3), (1, 7, 5, 1)])
def test_gradient_difference_matches_torch(shape):
  x = np.tanh(_randn(2, shape))  # frames live in [-1, 1]
  y = np.tanh(_randn(3, shape))
  out = np.asarray(filters.gradient_difference(x, y))
  assert out.shape == (*shape[:3], 1)
  # Map values reach ~6 here, where a float32 ulp is 4.8e-7, and float32 channel sums and
  # differences in another order than torch's conv differ by a few ulps (1.4e-6 seen against
  # torch float32, 1.1e-6 against the float64 result). So 1e-6 absolute plus 1e-6 relative.
  ref64 = torch_gradient_loss(y.astype(np.float64), x.astype(np.float64))
  np.testing.assert_allclose(out, ref64, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out, torch_gradient_loss(y, x), rtol=1e-6, atol=1e-6)


def test_gradient_difference_border_convention():
  # Against y = 0, dx is the backward difference s[h, w] - s[h, w - 1] of the channel sum with
  # s[h, -1] = 0 (and likewise for dy), so the top-left pixel is 2 * |s[0, 0]|.
  x = _randn(4, (1, 5, 6, 3))
  s = x.sum(-1)[0]
  dx = s - np.pad(s, ((0, 0), (1, 0)))[:, :-1]
  dy = s - np.pad(s, ((1, 0), (0, 0)))[:-1, :]
  out = np.asarray(filters.gradient_difference(x, np.zeros_like(x)))[0, ..., 0]
  np.testing.assert_allclose(out, np.abs(dx) + np.abs(dy), atol=1e-6)
  np.testing.assert_allclose(out[0, 0], 2 * abs(s[0, 0]), atol=1e-6)


def test_gradient_difference_shape_mismatch():
  with pytest.raises(ValueError, match="same shape"):
    filters.gradient_difference(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 1)))


# ------------------------------------------------------------------------------------------------
# Smoothness (Smooth_Loss).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ks", [3, 5, 7])
def test_smoothness_kernels_are_zero_sum(ks):
  k1, k2 = filters.smoothness_kernel_1d(ks), filters.smoothness_kernel_2d(ks)
  assert k1.shape == (ks,) and k2.shape == (ks, ks)
  assert k1[ks // 2] == 1 and k2[ks // 2, ks // 2] == 1
  np.testing.assert_allclose(k1[0], -1.0 / (ks - 1))
  np.testing.assert_allclose(k2[0, 0], -1.0 / (ks * ks - 1))
  np.testing.assert_allclose(k1.sum(), 0, atol=1e-6)
  np.testing.assert_allclose(k2.sum(), 0, atol=1e-6)


@pytest.mark.parametrize("ks", [3, 7])
def test_smoothness_matches_torch(ks):
  o = 0.05 * _randn(5, (2, 24, 20, 2))  # offsets are small (normalised units)
  ref1, ref2 = torch_smooth_1d_map(o, ks), torch_smooth_2d_map(o, ks)
  map1 = np.asarray(filters.smoothness_1d(o, ks, reduce=False))
  map2 = np.asarray(filters.smoothness_2d(o, ks, reduce=False))
  assert map1.shape == map2.shape == (2, 24, 20, 1)
  np.testing.assert_allclose(map1, ref1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(map2, ref2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(filters.smoothness_1d(o, ks), ref1.mean(), rtol=1e-5)
  np.testing.assert_allclose(filters.smoothness_2d(o, ks), ref2.mean(), rtol=1e-5)


def test_smoothness_is_zero_on_constant_field_interior():
  o = np.full((1, 9, 9, 2), 0.3, np.float32)
  m = np.asarray(filters.smoothness_2d(o, 3, reduce=False))[0, ..., 0]
  np.testing.assert_allclose(m[1:-1, 1:-1], 0, atol=1e-6)
  assert np.all(m[0] > 0)  # the zero padding makes the border non-smooth, as in torch


@pytest.mark.parametrize("ks", [1, 2, 4])
def test_smoothness_rejects_even_or_tiny_kernels(ks):
  with pytest.raises(ValueError, match="odd integer"):
    filters.smoothness_1d(np.zeros((1, 8, 8, 2), np.float32), ks)


# ------------------------------------------------------------------------------------------------
# gaussian_blur.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("sigma", "shape", "truncate"),
  [
    (4.0, (2, 256, 256), 4.0),  # PPDM's anomaly-map smoothing
    (4.0, (2, 8, 8), 4.0),  # radius 16 > 8: the reflection repeats several times
    (0.5, (2, 33, 17, 3), 4.0),
    (1.0, (1, 20, 31, 2), 4.0),
    (2.5, (1, 40, 40), 2.0),
    (6.3, (1, 5, 3), 4.0),
  ],
)
def test_gaussian_blur_matches_scipy(sigma, shape, truncate):
  x = _randn(6, shape)
  out = np.asarray(filters.gaussian_blur(x, sigma, truncate=truncate))
  assert out.shape == shape and out.dtype == np.float32
  np.testing.assert_allclose(out, scipy_blur(x, sigma, truncate), rtol=0, atol=1e-5)


@given(
  h=st.integers(1, 10),
  w=st.integers(1, 10),
  sigma=st.floats(0.2, 6.0),
  seed=st.integers(0, 2**16),
)
def test_gaussian_blur_random_small_images(h, w, sigma, seed):
  x = _randn(seed, (1, h, w))
  np.testing.assert_allclose(filters.gaussian_blur(x, sigma), scipy_blur(x, sigma), atol=1e-5)


def test_gaussian_blur_zero_sigma_is_identity_and_bad_args_raise():
  x = _randn(7, (1, 6, 6))
  np.testing.assert_array_equal(filters.gaussian_blur(x, 0.0), x)
  with pytest.raises(ValueError, match="sigma"):
    filters.gaussian_blur(x, -1.0)
  with pytest.raises(ValueError, match="truncate"):
    filters.gaussian_blur(x, 1.0, truncate=0.0)


# ------------------------------------------------------------------------------------------------
# coord_channels / add_coords (AddCoords2d).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "fs"), [(32, 32), (32, 8), (64, 32), (64, 16), (256, 32)])
def test_coord_channels_match_spec_loop(size, fs):
  # fs = 32 is PDM's fixed setting; fs = S / 4 is PPDM's (S=32 -> 8, 64 -> 16, 256 -> 64 below).
  out = filters.coord_channels(size, num_blocks=fs)
  assert out.shape == (size, size, 4) and out.dtype == np.float32
  np.testing.assert_allclose(out, spec_coords(size, fs), rtol=0, atol=1e-6)


def test_coord_channels_ppdm_256():
  np.testing.assert_allclose(
    filters.coord_channels(256, num_blocks=64), spec_coords(256, 64), rtol=0, atol=1e-6
  )


def test_coord_channels_spec_statements():
  c32 = filters.coord_channels(32, num_blocks=32)
  np.testing.assert_array_equal(c32[..., 0], -1.0)  # "at S=32 the fine channel is exactly -1"
  np.testing.assert_array_equal(c32[..., 2], -1.0)
  c256 = filters.coord_channels(256, num_blocks=32)
  for ch in (0, 2):
    assert np.max(np.abs(c256[..., ch] + 1.0)) <= 0.07
  # Coarse channels span [-1, 1]; xx/xx_ vary along rows only, yy/yy_ along columns only.
  assert c256[..., 1].min() == -1.0 and c256[..., 1].max() == 1.0
  assert np.all(c256[:, :1, :2] == c256[:, :, :2]) and np.all(c256[:1, :, 2:] == c256[:, :, 2:])


def test_coord_channels_single_block_and_errors():
  c = filters.coord_channels(8, num_blocks=1)
  np.testing.assert_array_equal(c[..., 1], -1.0)  # coarse := 0 instead of 0 / 0
  np.testing.assert_allclose(c[:, 0, 0], 2 * np.arange(8) / 7 - 1, atol=1e-7)
  with pytest.raises(ValueError, match=r"fs=32.*S=48"):
    filters.coord_channels(48, num_blocks=32)
  with pytest.raises(ValueError, match="num_blocks"):
    filters.coord_channels(32, num_blocks=0)


def test_add_coords():
  x = _randn(8, (2, 16, 16, 3)).astype(jnp.bfloat16)
  out = filters.add_coords(x, num_blocks=4)
  assert out.shape == (2, 16, 16, 7) and out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out[..., :3], x)
  np.testing.assert_array_equal(
    out[1, ..., 3:], filters.coord_channels(16, num_blocks=4).astype(jnp.bfloat16)
  )
  with pytest.raises(ValueError, match="square"):
    filters.add_coords(np.zeros((1, 16, 8, 1), np.float32), num_blocks=4)


# ------------------------------------------------------------------------------------------------
# Every op under jit, vmap, grad; one compilation per shape.
# ------------------------------------------------------------------------------------------------

_Y = jnp.asarray(_randn(9, (2, 16, 16, 2)))

OPS = {
  "box_filter_max": lambda x: filters.box_filter_max(x, (7, 18)),
  "gradient_difference": lambda x: filters.gradient_difference(x, _Y.astype(x.dtype)),
  "smoothness_1d": lambda x: filters.smoothness_1d(x, 3, reduce=False),
  "smoothness_2d": lambda x: filters.smoothness_2d(x, 3, reduce=False),
  "gaussian_blur": lambda x: filters.gaussian_blur(x, 2.0),
  "add_coords": lambda x: filters.add_coords(x, num_blocks=4),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_jit_vmap_and_single_trace(name):
  op = OPS[name]
  x = _randn(10, (3, 2, 16, 16, 2))
  eager = np.stack([np.asarray(op(xi)) for xi in x])
  np.testing.assert_allclose(jax.jit(jax.vmap(op))(x), eager, rtol=1e-6, atol=1e-6)

  chex.clear_trace_counter()  # chex keys counters by code location, shared across parameters

  @jax.jit
  @chex.assert_max_traces(n=1)
  def jitted(xi):
    return op(xi)

  for xi in x:  # same shape, different values: must reuse the first compilation
    np.testing.assert_allclose(jitted(xi), op(xi), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_grad_matches_finite_differences(name):
  op = OPS[name]
  # float64 so that central differences are accurate; the ops are piecewise linear or linear.
  with jax.enable_x64(True):
    x = jnp.asarray(_randn(11, (2, 16, 16, 2)), jnp.float64)
    w = jnp.asarray(_randn(12, np.shape(op(x))), jnp.float64)

    def scalar(x):
      return jnp.sum(op(x) * w)

    g = jax.grad(scalar)(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.max(jnp.abs(g))) > 0
    check_grads(scalar, (x,), order=1, modes=("rev",), eps=1e-6)
