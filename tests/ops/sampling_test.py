"""grid_sample / resize / warp: parity with torch in values and gradients, and properties."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dmad_jax.ops import sampling

MODES = ["bilinear", "nearest"]
PADDINGS = ["zeros", "border", "reflection"]


def _nchw(a):
  return torch.tensor(np.asarray(a)).permute(0, 3, 1, 2).contiguous()


def _nhwc(t):
  return t.permute(0, 2, 3, 1).detach().numpy()


def _torch_grid_sample(x, grid, g, **kw):
  xt = _nchw(x).requires_grad_(True)
  gt = torch.tensor(grid).requires_grad_(True)
  out = F.grid_sample(xt, gt, **kw)
  out.backward(_nchw(g))
  return _nhwc(out), _nhwc(xt.grad), gt.grad.numpy()


def _jax_grid_sample(x, grid, g, **kw):
  out, vjp = jax.vjp(lambda a, b: sampling.grid_sample(a, b, **kw), x, grid)
  gx, gg = vjp(jnp.asarray(g))
  return np.asarray(out), np.asarray(gx), np.asarray(gg)


@pytest.fixture(params=["cpu_kernels", "xla"])
def formulation(request, monkeypatch):
  """Runs a test with the C++ CPU kernels (the default here) and with the pure-XLA formulation
  that GPUs and TPUs use."""
  if request.param == "xla":
    monkeypatch.setattr(sampling.cpu_kernels, "available", lambda: False)
  else:
    assert sampling.cpu_kernels.available(), sampling.cpu_kernels.unavailable_reason()
  return request.param


@pytest.mark.parametrize(
  "mode,padding_mode,align_corners", list(itertools.product(MODES, PADDINGS, [True, False]))
)
def test_grid_sample_matches_torch(mode, padding_mode, align_corners, formulation):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
  # Points well outside [-1, 1] exercise zero padding, clipping and repeated reflection.
  grid = rng.uniform(-2.5, 2.5, (2, 5, 6, 2)).astype(np.float32)
  g = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
  kw = dict(mode=mode, padding_mode=padding_mode, align_corners=align_corners)
  got = _jax_grid_sample(x, grid, g, **kw)
  want = _torch_grid_sample(x, grid, g, **kw)
  for name, a, b in zip(["value", "grad_x", "grad_grid"], got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_grid_sample_matches_torch_at_feature_map_size(padding_mode, formulation):
  """A DMAD-sized case (64x64x16, upsampled 2x): grid gradients grow with the image size, so
  compare relative to their scale."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 64, 64, 16)).astype(np.float32)
  grid = rng.uniform(-1.2, 1.2, (2, 128, 128, 2)).astype(np.float32)
  g = rng.standard_normal((2, 128, 128, 16)).astype(np.float32)
  got = _jax_grid_sample(x, grid, g, padding_mode=padding_mode, align_corners=True)
  want = _torch_grid_sample(x, grid, g, padding_mode=padding_mode, align_corners=True)
  for name, a, b in zip(["value", "grad_x", "grad_grid"], got, want, strict=True):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=1e-5, err_msg=name)


def test_grid_sample_on_exact_pixel_borders_matches_torch(formulation):
  """Grid values exactly on -1, +1 and on pixel centres: torch's tie conventions."""
  x = np.arange(2 * 4 * 5 * 2, dtype=np.float32).reshape(2, 4, 5, 2) / 10
  vals = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, -1.5], np.float32)
  gx, gy = np.meshgrid(vals, vals)
  grid = np.broadcast_to(np.stack([gx, gy], -1), (2, 7, 7, 2)).copy()
  g = np.ones((2, 7, 7, 2), np.float32)
  for mode, pad, ac in itertools.product(MODES, PADDINGS, [True, False]):
    kw = dict(mode=mode, padding_mode=pad, align_corners=ac)
    got = _jax_grid_sample(x, grid, g, **kw)
    want = _torch_grid_sample(x, grid, g, **kw)
    for name, a, b in zip(["value", "grad_x", "grad_grid"], got, want, strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=f"{name} {kw}")


@pytest.mark.slow
@settings(max_examples=12)  # each new shape compiles; 12 shapes cover the edge sizes
@given(
  n=st.integers(1, 3),
  h=st.integers(1, 9),
  w=st.integers(1, 9),
  c=st.integers(1, 4),
  mode=st.sampled_from(MODES),
  padding_mode=st.sampled_from(PADDINGS),
  align_corners=st.booleans(),
)
def test_identity_grid_returns_input(n, h, w, c, mode, padding_mode, align_corners):
  x = jax.random.normal(jax.random.key(n * 100 + h * 10 + w), (n, h, w, c))
  grid = sampling.identity_grid(n, h, w, align_corners=align_corners)
  # One jit per example: eager mode would compile every primitive for every new shape.
  out = jax.jit(sampling.grid_sample, static_argnames=("mode", "padding_mode", "align_corners"))(
    x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners
  )
  np.testing.assert_allclose(out, x, atol=1e-5)


def test_identity_grid_equals_dmad_base_grid():
  grid = np.asarray(sampling.identity_grid(1, 4, 6))
  np.testing.assert_allclose(grid[0, 2, :, 0], np.linspace(-1, 1, 6), atol=1e-7)  # x on columns
  np.testing.assert_allclose(grid[0, :, 3, 1], np.linspace(-1, 1, 4), atol=1e-7)  # y on rows


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [(16, 16), (5, 11), (3, 2), (1, 4), (7, 9)])
def test_resize_bilinear_matches_interpolate(align_corners, size):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
  g = rng.standard_normal((2, *size, 3)).astype(np.float32)
  out, vjp = jax.vjp(lambda a: sampling.resize_bilinear(a, size, align_corners=align_corners), x)
  (gx,) = vjp(jnp.asarray(g))
  xt = _nchw(x).requires_grad_(True)
  ot = F.interpolate(xt, size=size, mode="bilinear", align_corners=align_corners)
  ot.backward(_nchw(g))
  np.testing.assert_allclose(out, _nhwc(ot), atol=1e-5)
  np.testing.assert_allclose(gx, _nhwc(xt.grad), atol=1e-5)


def test_resize_differs_from_jax_image_resize():
  """The reason resize_bilinear exists: jax.image.resize is half-pixel."""
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  ours = sampling.resize_bilinear(x, 8, align_corners=True)
  theirs = jax.image.resize(x, (1, 8, 8, 1), "bilinear")
  assert float(jnp.abs(ours - theirs).max()) > 0.1
  # align_corners=True keeps the corner pixels.
  np.testing.assert_allclose(ours[0, [0, -1]][:, [0, -1], 0], [[0, 3], [12, 15]], atol=1e-6)


def _torch_warp(img, offsets, size):
  """DMAD's warp as the official code writes it (NCHW in, offsets (B,2,h,w))."""
  o = F.interpolate(offsets, size=size, mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
  gx = torch.linspace(-1, 1, size[1]).view(1, 1, -1).expand(1, size[0], size[1])
  gy = torch.linspace(-1, 1, size[0]).view(1, -1, 1).expand(1, size[0], size[1])
  base = torch.stack([gx, gy], -1)
  grid = torch.clamp(base + o, -1, 1)
  return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def test_chained_warps_match_dmad_torch_warps():
  rng = np.random.default_rng(3)
  img = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  o1 = (np.tanh(rng.standard_normal((2, 8, 8, 2))) * 4 / 32).astype(np.float32)  # coarse
  o2 = (np.tanh(rng.standard_normal((2, 32, 32, 2))) * 6 / 32).astype(np.float32)  # fine
  g = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)

  def f(img, o1, o2):
    return sampling.warp(sampling.warp(img, o1), o2)  # DMAD's coarse-to-fine chain

  out, vjp = jax.vjp(f, img, o1, o2)
  grads = vjp(jnp.asarray(g))

  it, t1, t2 = (_nchw(a).requires_grad_(True) for a in (img, o1, o2))
  ot = _torch_warp(_torch_warp(it, t1, (32, 32)), t2, (32, 32))
  ot.backward(_nchw(g))
  # Two chained warps in float32: the grid rounding of each stage is amplified by the image
  # gradient of the next one, hence 3e-5 here and 1e-5 for a single grid_sample.
  np.testing.assert_allclose(out, _nhwc(ot), atol=3e-5)
  for a, t in zip(grads, (it, t1, t2), strict=True):
    scale = max(1.0, float(t.grad.abs().max()))
    np.testing.assert_allclose(np.asarray(a) / scale, _nhwc(t.grad) / scale, atol=3e-5)


def test_zero_offsets_warp_is_identity():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  out = sampling.warp(x, jnp.zeros((2, 4, 4, 2)))
  np.testing.assert_allclose(out, x, atol=1e-5)


def test_clamp_grid_gradient_matches_torch_clamp_at_ties():
  vals = np.array([-1.5, -1.0, -0.3, 1.0, 1.2], np.float32)
  (g,) = jax.grad(lambda v: sampling.clamp_grid(v).sum(), argnums=(0,))(jnp.asarray(vals))
  t = torch.tensor(vals, requires_grad=True)
  torch.clamp(t, -1, 1).sum().backward()
  np.testing.assert_array_equal(np.asarray(g), t.grad.numpy())


def test_ops_under_vmap_match_a_loop():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 2)).astype(np.float32))
  grid = jnp.asarray(rng.uniform(-1.2, 1.2, (3, 2, 5, 5, 2)).astype(np.float32))
  vm = jax.vmap(sampling.grid_sample)(x, grid)
  loop = jnp.stack([sampling.grid_sample(x[i], grid[i]) for i in range(3)])
  np.testing.assert_allclose(vm, loop, atol=1e-6)
  gvm = jax.vmap(jax.grad(lambda a, b: jnp.sum(sampling.grid_sample(a, b) ** 2), (0, 1)))(x, grid)
  for i in range(3):
    gi = jax.grad(lambda a, b: jnp.sum(sampling.grid_sample(a, b) ** 2), (0, 1))(x[i], grid[i])
    np.testing.assert_allclose(gvm[0][i], gi[0], atol=1e-5)
    np.testing.assert_allclose(gvm[1][i], gi[1], atol=1e-5)
  rv = jax.vmap(lambda a: sampling.resize_bilinear(a, (11, 13)))(x)
  assert rv.shape == (3, 2, 11, 13, 2)


def test_each_op_compiles_once_under_jit_and_grad():
  rng = np.random.default_rng(5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, offsets):
    def loss(x, offsets):
      y = sampling.warp(sampling.warp(x, offsets), offsets)
      y = sampling.resize_bilinear(y, (8, 8))
      return jnp.sum(y**2)

    return jax.grad(loss, (0, 1))(x, offsets)

  for _ in range(3):
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)).astype(np.float32))
    o = jnp.asarray(rng.uniform(-0.1, 0.1, (2, 4, 4, 2)).astype(np.float32))
    gx, go = step(x, o)
    assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(go)).all()
    assert float(jnp.abs(go).sum()) > 0  # gradients reach the offsets
  chex.clear_trace_counter()


def test_bad_arguments_raise():
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match="mode"):
    sampling.grid_sample(x, jnp.zeros((1, 2, 2, 2)), mode="bicubic")
  with pytest.raises(ValueError, match="padding_mode"):
    sampling.grid_sample(x, jnp.zeros((1, 2, 2, 2)), padding_mode="wrap")
  with pytest.raises(ValueError, match=r"grid \(1, 2, 2, 3\)"):
    sampling.grid_sample(x, jnp.zeros((1, 2, 2, 3)))
