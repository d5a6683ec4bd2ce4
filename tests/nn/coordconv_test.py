"""Tests for dmad_jax.nn.coordconv.CoordConv, including parity with a PyTorch CoordConv2d."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from dmad_jax.nn.coordconv import CoordConv
from dmad_jax.ops import filters


def torch_add_coords(x: torch.Tensor, fs: int) -> torch.Tensor:
  """AddCoords2d from the spec, NCHW: appends [xx, xx_, yy, yy_] (xx* along rows, yy* columns)."""
  n, _, h, w = x.shape
  b = h // fs
  i = torch.arange(h, dtype=torch.float32)
  coarse = torch.div(i, b, rounding_mode="floor") / (fs - 1)
  fine = i / (h - 1) - coarse
  fine, coarse = fine * 2 - 1, coarse * 2 - 1
  rows = [v.view(1, 1, h, 1).expand(n, 1, h, w) for v in (fine, coarse)]
  cols = [v.view(1, 1, 1, w).expand(n, 1, h, w) for v in (fine, coarse)]
  return torch.cat([x, *rows, *cols], dim=1)


def _init(module, shape, seed=0):
  x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
  return x, module.init(jax.random.key(seed), x)


def test_shapes_and_parameter_count():
  module = CoordConv(features=8)
  x, variables = _init(module, (2, 32, 32, 5))
  assert list(variables) == ["params"]
  # Only the conv over C + 4 channels is a parameter: no bias, no unused C -> features weight.
  chex.assert_trees_all_equal_shapes(
    variables["params"], {"conv": {"kernel": np.zeros((3, 3, 9, 8))}}
  )
  n_params = sum(p.size for p in jax.tree.leaves(variables))
  assert n_params == 3 * 3 * (5 + 4) * 8
  assert module.apply(variables, x).shape == (2, 32, 32, 8)
  strided = CoordConv(features=4, strides=2, num_blocks=16)
  x, variables = _init(strided, (1, 64, 64, 3))
  assert strided.apply(variables, x).shape == (1, 32, 32, 4)


def test_default_init_matches_torch_conv2d_bounds():
  # torch Conv2d: kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 9 * (C + 4).
  module = CoordConv(features=64, use_bias=True)
  _, variables = _init(module, (1, 32, 32, 12))
  kernel, bias = variables["params"]["conv"]["kernel"], variables["params"]["conv"]["bias"]
  bound = 1.0 / math.sqrt(3 * 3 * 16)
  assert bias.shape == (64,)
  for p in (kernel, bias):
    assert float(jnp.max(jnp.abs(p))) <= bound
  assert float(jnp.max(jnp.abs(kernel))) > 0.95 * bound
  np.testing.assert_allclose(jnp.std(kernel), bound / math.sqrt(3), rtol=0.05)
  ref = torch.nn.Conv2d(16, 64, 3, padding=1)
  np.testing.assert_allclose(ref.weight.detach().abs().max().item(), bound, rtol=0.05)


def test_apply_equals_manual_add_coords_and_conv():
  module = CoordConv(features=6, num_blocks=8)
  x, variables = _init(module, (2, 32, 32, 3), seed=1)
  kernel = variables["params"]["conv"]["kernel"]
  manual = lax.conv_general_dilated(
    filters.add_coords(x, num_blocks=8),
    kernel,
    window_strides=(1, 1),
    padding=((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  np.testing.assert_allclose(module.apply(variables, x), manual, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("size", "fs", "channels"), [(32, 32, 12), (64, 32, 8), (64, 16, 4)])
def test_torch_parity(size, fs, channels):
  # fs = 32 is DMAD-PDM's setting at every decoder size; fs = S / 4 is DMAD-PPDM's.
  features = 10
  module = CoordConv(features=features, num_blocks=fs)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, size, size, channels)).astype(np.float32)
  # A random kernel at torch's init scale; skipping module.init saves a compilation per case.
  bound = 1.0 / math.sqrt(9 * (channels + 4))
  kernel = rng.uniform(-bound, bound, (3, 3, channels + 4, features)).astype(np.float32)
  variables = {"params": {"conv": {"kernel": jnp.asarray(kernel)}}}

  x_t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  coords_t = torch_add_coords(x_t, fs)
  # The spec's formula in torch is bit-identical to the NumPy coordinate channels.
  np.testing.assert_array_equal(
    coords_t[0, channels:].permute(1, 2, 0).numpy(), filters.coord_channels(size, num_blocks=fs)
  )
  conv = torch.nn.Conv2d(channels + 4, features, 3, stride=1, padding=1, bias=False)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))  # HWIO -> OIHW
    ref = conv(coords_t).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(module.apply(variables, x), ref, rtol=1e-5, atol=1e-5)


def test_jit_compiles_once_and_grads_are_finite():
  module = CoordConv(features=4, num_blocks=4)
  x, variables = _init(module, (2, 16, 16, 3), seed=3)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss(params, x):
    return jnp.mean(module.apply({"params": params}, x) ** 2)

  for k in range(3):
    loss(variables["params"], x + k)
  grads = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_bfloat16_compute_dtype():
  module = CoordConv(features=4, num_blocks=4, dtype=jnp.bfloat16)
  x, variables = _init(module, (1, 16, 16, 3))
  assert variables["params"]["conv"]["kernel"].dtype == jnp.float32
  assert module.apply(variables, x).dtype == jnp.bfloat16


def test_rejects_non_square_and_bad_num_blocks():
  with pytest.raises(ValueError, match="square"):
    _init(CoordConv(features=2, num_blocks=4), (1, 16, 8, 1))
  with pytest.raises(ValueError, match=r"fs=32.*S=48"):
    _init(CoordConv(features=2), (1, 48, 48, 1))
