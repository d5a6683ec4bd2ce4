"""Tests for dmad_jax.nn.attention: SE, ECA, CBAM and SSPCAB, with PyTorch references of the
published definitions (written here, NCHW) for parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmad_jax.nn.attention import (
  ATTENTIONS,
  CBAM,
  ECA,
  SSPCAB,
  SqueezeExcitation,
  eca_kernel_size,
  make_attention,
)

SHAPE = (2, 8, 8, 16)


def _input(shape=SHAPE, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _init(module, x, seed=0):
  return module.init(jax.random.key(seed), x)


def _copy(tree):
  """A fresh nested dict over the same leaves, safe to modify."""
  return jax.tree.map(lambda a: a, tree)


# ----------------------------------------------------------------------------------------------
# PyTorch references (NCHW), from the papers' definitions, and parameter copying.


def _t(a):
  return torch.from_numpy(np.array(a, np.float32))


def _nchw(x):
  return _t(x).permute(0, 3, 1, 2).contiguous()


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _load_linear(linear: torch.nn.Linear, p):
  """Dense kernel (in, out) -> Linear weight (out, in)."""
  with torch.no_grad():
    linear.weight.copy_(_t(p["kernel"]).T)
    linear.bias.copy_(_t(p["bias"]))


def _conv_weight(kernel):
  """Flax conv kernel (kh, kw, in, out) -> torch Conv2d weight (out, in, kh, kw)."""
  return _t(kernel).permute(3, 2, 0, 1).contiguous()


class TorchSE(torch.nn.Module):
  def __init__(self, c, reduction):
    super().__init__()
    hidden = max(1, c // reduction)
    self.fc1 = torch.nn.Linear(c, hidden)
    self.fc2 = torch.nn.Linear(hidden, c)

  def load(self, p):
    _load_linear(self.fc1, p["fc1"])
    _load_linear(self.fc2, p["fc2"])
    return self

  def forward(self, x):
    s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
    return x * s[:, :, None, None]


class TorchECA(torch.nn.Module):
  def __init__(self, k):
    super().__init__()
    self.conv = torch.nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

  def load(self, p):
    with torch.no_grad():  # flax (k, in=1, out=1) -> torch (out=1, in=1, k)
      self.conv.weight.copy_(_t(p["conv"]["kernel"]).permute(2, 1, 0))
    return self

  def forward(self, x):
    y = x.mean(dim=(2, 3))[:, None, :]  # (N, 1, C): one channel, length C
    s = torch.sigmoid(self.conv(y))[:, 0]
    return x * s[:, :, None, None]


class TorchCBAM(torch.nn.Module):
  def __init__(self, c, reduction, k):
    super().__init__()
    hidden = max(1, c // reduction)
    self.fc1 = torch.nn.Linear(c, hidden)
    self.fc2 = torch.nn.Linear(hidden, c)
    self.spatial = torch.nn.Conv2d(2, 1, k, padding=k // 2, bias=False)

  def load(self, p):
    _load_linear(self.fc1, p["mlp_fc1"])
    _load_linear(self.fc2, p["mlp_fc2"])
    with torch.no_grad():
      self.spatial.weight.copy_(_conv_weight(p["spatial"]["kernel"]))
    return self

  def mlp(self, v):
    return self.fc2(torch.relu(self.fc1(v)))

  def forward(self, x):
    mc = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))
    x1 = x * mc[:, :, None, None]
    maps = torch.cat([x1.mean(dim=1, keepdim=True), x1.amax(dim=1, keepdim=True)], dim=1)
    return x1 * torch.sigmoid(self.spatial(maps))


class TorchSSPCAB(torch.nn.Module):
  """The masked convolution as ONE K x K kernel times the corner mask (the other layout from the
  Flax module's four convolutions), then ReLU and SE."""

  def __init__(self, c, kernel_dim, dilation, reduction):
    super().__init__()
    self.k, self.d = kernel_dim, dilation
    self.size = 2 * kernel_dim + 2 * dilation + 1
    self.weight = torch.nn.Parameter(torch.zeros(c, c, self.size, self.size))
    self.bias = torch.nn.Parameter(torch.zeros(c))
    self.se = TorchSE(c, reduction)
    corner = torch.zeros(self.size)
    corner[:kernel_dim] = 1
    corner[-kernel_dim:] = 1
    self.register_buffer("mask", corner[:, None] * corner[None, :])

  def load(self, p):
    k, far = self.k, self.size - self.k
    # conv1 top-left, conv2 bottom-left, conv3 top-right, conv4 bottom-right (rows, columns).
    offsets = {"conv1": (0, 0), "conv2": (far, 0), "conv3": (0, far), "conv4": (far, far)}
    with torch.no_grad():
      self.bias.zero_()
      for name, (r, q) in offsets.items():
        self.weight[:, :, r : r + k, q : q + k] = _conv_weight(p[name]["kernel"])
        self.bias += _t(p[name]["bias"])
    self.se.load(p["se"])
    return self

  def forward(self, x):
    y = F.conv2d(x, self.weight * self.mask, self.bias, padding=self.k + self.d)
    out = self.se(torch.relu(y))
    return out, F.mse_loss(out, x)


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, parameter layout.


def _blocks():
  return [
    SqueezeExcitation(reduction=4),
    ECA(),
    CBAM(reduction=4, spatial_kernel=3),
    SSPCAB(kernel_dim=1, dilation=1, reduction=4),
  ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("index", range(4), ids=["se", "eca", "cbam", "sspcab"])
def test_shape_and_dtype_are_kept(index, dtype):
  module = _blocks()[index].clone(dtype=dtype)
  x = _input(dtype=dtype)
  variables = _init(module, x)
  assert list(variables) == ["params"]  # SSPCAB's loss is not sown by init
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = module.apply(variables, x)
  assert out.shape == x.shape and out.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  if dtype == jnp.bfloat16:  # the same parameters in float32 give nearly the same output
    ref = module.clone(dtype=jnp.float32).apply(variables, x.astype(jnp.float32))
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=5e-2, atol=5e-2)


def test_parameter_layout():
  c = SHAPE[-1]
  x = _input()

  def shapes(module):
    return jax.tree.map(jnp.shape, _init(module, x)["params"])

  dense = lambda i, o: {"kernel": (i, o), "bias": (o,)}
  assert shapes(SqueezeExcitation()) == {"fc1": dense(c, 1), "fc2": dense(1, c)}
  assert shapes(SqueezeExcitation(reduction=4)) == {"fc1": dense(c, 4), "fc2": dense(4, c)}
  assert shapes(ECA()) == {"conv": {"kernel": (eca_kernel_size(c), 1, 1)}}
  assert shapes(ECA(kernel_size=5)) == {"conv": {"kernel": (5, 1, 1)}}
  assert shapes(CBAM()) == {
    "mlp_fc1": dense(c, 1),
    "mlp_fc2": dense(1, c),
    "spatial": {"kernel": (7, 7, 2, 1)},
  }
  conv = {"kernel": (2, 2, c, c), "bias": (c,)}
  assert shapes(SSPCAB(kernel_dim=2)) == {
    **{f"conv{i}": conv for i in range(1, 5)},
    "se": {"fc1": dense(c, 2), "fc2": dense(2, c)},
  }


# ----------------------------------------------------------------------------------------------
# Parity with the PyTorch references.


def _assert_parity(out, ref):
  np.testing.assert_allclose(np.asarray(out), _nhwc(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", [4, 16])
def test_se_matches_torch(reduction):
  x = _input()
  module = SqueezeExcitation(reduction=reduction)
  variables = _init(module, x)
  ref = TorchSE(SHAPE[-1], reduction).load(variables["params"])(_nchw(x))
  _assert_parity(module.apply(variables, x), ref)


@pytest.mark.parametrize("kernel_size", [0, 5])
def test_eca_matches_torch(kernel_size):
  x = _input()
  module = ECA(kernel_size=kernel_size)
  variables = _init(module, x)
  k = variables["params"]["conv"]["kernel"].shape[0]
  assert k == (kernel_size or eca_kernel_size(SHAPE[-1]))
  ref = TorchECA(k).load(variables["params"])(_nchw(x))
  _assert_parity(module.apply(variables, x), ref)


@pytest.mark.parametrize(("reduction", "spatial_kernel"), [(4, 7), (2, 3)])
def test_cbam_matches_torch(reduction, spatial_kernel):
  x = _input()
  module = CBAM(reduction=reduction, spatial_kernel=spatial_kernel)
  variables = _init(module, x)
  ref = TorchCBAM(SHAPE[-1], reduction, spatial_kernel).load(variables["params"])(_nchw(x))
  _assert_parity(module.apply(variables, x), ref)


@pytest.mark.parametrize(("kernel_dim", "dilation"), [(1, 1), (2, 1), (1, 2), (1, 0)])
def test_sspcab_matches_torch(kernel_dim, dilation):
  x = _input()
  module = SSPCAB(kernel_dim=kernel_dim, dilation=dilation, reduction=4)
  variables = _init(module, x)
  ref, ref_loss = TorchSSPCAB(SHAPE[-1], kernel_dim, dilation, 4).load(variables["params"])(
    _nchw(x)
  )
  out, state = module.apply(variables, x, mutable=["losses"])
  _assert_parity(out, ref)
  np.testing.assert_allclose(state["losses"]["sspcab"][0], ref_loss.item(), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# SE and ECA with zeroed weights.


def test_se_with_zero_fc2_kernel_scales_by_sigmoid_of_its_bias():
  x = _input()
  module = SqueezeExcitation(reduction=4)
  variables = _copy(_init(module, x))
  b = jnp.float32(0.3)
  fc2 = variables["params"]["fc2"]
  fc2["kernel"] = jnp.zeros_like(fc2["kernel"])
  fc2["bias"] = jnp.full_like(fc2["bias"], b)
  np.testing.assert_array_equal(module.apply(variables, x), x * jax.nn.sigmoid(b))


def test_eca_with_zero_kernel_halves_the_input():
  x = _input()
  module = ECA()
  variables = _copy(_init(module, x))
  variables["params"]["conv"]["kernel"] = jnp.zeros_like(variables["params"]["conv"]["kernel"])
  np.testing.assert_array_equal(module.apply(variables, x), x * 0.5)


def test_eca_kernel_size_formula():
  # t = int(|(log2 C + 1) / 2|), k = t if odd else t + 1:
  #   64: 7/2 = 3.5 -> 3 -> 3;      128: 8/2 = 4 -> 5;          256: 9/2 = 4.5 -> 4 -> 5;
  #   512: 10/2 = 5 -> 5;           768: (9.585 + 1)/2 = 5.29 -> 5;  1024: 11/2 = 5.5 -> 5;
  #   2048: 12/2 = 6 -> 7.
  expected = {64: 3, 128: 5, 256: 5, 512: 5, 768: 5, 1024: 5, 2048: 7}
  assert {c: eca_kernel_size(c) for c in expected} == expected
  assert eca_kernel_size(16) == 3  # (4 + 1) / 2 = 2.5 -> 2 -> 3
  assert eca_kernel_size(64, gamma=1, b=0) == 7  # 6 is even -> 7


def test_even_kernels_are_rejected():
  x = _input()
  with pytest.raises(ValueError, match="odd"):
    _init(ECA(kernel_size=4), x)
  with pytest.raises(ValueError, match="odd"):
    _init(CBAM(spatial_kernel=4), x)


# ----------------------------------------------------------------------------------------------
# CBAM on a constant input.


@pytest.mark.parametrize("zero_fc2_kernel", [False, True])
def test_cbam_on_constant_input(zero_fc2_kernel):
  k, h = 7, 12
  module = CBAM(reduction=4, spatial_kernel=k)
  x = jnp.full((2, h, h, SHAPE[-1]), 0.7, jnp.float32)
  variables = _copy(_init(module, x))
  fc1, fc2 = variables["params"]["mlp_fc1"], variables["params"]["mlp_fc2"]
  if zero_fc2_kernel:
    fc2["kernel"] = jnp.zeros_like(fc2["kernel"])
    fc2["bias"] = jnp.full_like(fc2["bias"], -0.2)
  out, state = module.apply(variables, x, mutable=["intermediates"])
  (mc,) = state["intermediates"]["channel_attention"]
  (ms,) = state["intermediates"]["spatial_attention"]
  assert mc.shape == (2, SHAPE[-1]) and ms.shape == (2, h, h, 1)

  # Average and max pooling coincide, so Mc = sigmoid(2 * MLP(0.7 * 1)), the same for every
  # sample (though not for every channel: fc2 gives each channel its own weights).
  v = jnp.full((SHAPE[-1],), 0.7, jnp.float32)
  mlp = jax.nn.relu(v @ fc1["kernel"] + fc1["bias"]) @ fc2["kernel"] + fc2["bias"]
  np.testing.assert_allclose(mc, jnp.broadcast_to(jax.nn.sigmoid(2 * mlp), mc.shape), rtol=1e-6)
  np.testing.assert_array_equal(mc[0], mc[1])
  if zero_fc2_kernel:  # MLP(v) = fc2's constant bias: the channel weights are all equal, too
    np.testing.assert_array_equal(mc, jnp.full_like(mc, jax.nn.sigmoid(jnp.float32(-0.4))))

  # x * Mc is constant over H, W, so the spatial map is constant wherever the k x k window does
  # not reach the zero padding, and it is that constant times x * Mc there.
  p = k // 2
  inner = np.asarray(ms[:, p : h - p, p : h - p, 0])
  np.testing.assert_allclose(inner, np.broadcast_to(inner[:1, :1, :1], inner.shape), rtol=1e-6)
  np.testing.assert_allclose(
    out[:, p : h - p, p : h - p, :],
    (x * mc[:, None, None, :])[:, p : h - p, p : h - p, :] * inner[0, 0, 0],
    rtol=1e-6,
  )
  assert not np.allclose(ms[0, 0, 0, 0], inner[0, 0, 0])  # the padded border does differ


# ----------------------------------------------------------------------------------------------
# SSPCAB: the masked convolution is blind to the centre; the sown loss.


def _masked_conv(module, variables, x):
  _, state = module.apply(variables, x, mutable=["intermediates"])
  (y,) = state["intermediates"]["masked_conv"]
  return y


def test_sspcab_masked_conv_ignores_the_centre_and_sees_the_corners():
  kernel_dim, dilation, i, j = 1, 1, 4, 3
  module = SSPCAB(kernel_dim=kernel_dim, dilation=dilation, reduction=4)
  x = _input()
  variables = _init(module, x)
  y = _masked_conv(module, variables, x)
  assert y.shape == SHAPE
  centre = _masked_conv(module, variables, x.at[:, i, j, :].add(5.0))
  np.testing.assert_array_equal(centre[:, i, j, :], y[:, i, j, :])
  off = kernel_dim + dilation
  corner = _masked_conv(module, variables, x.at[:, i + off, j + off, :].add(5.0))
  assert np.abs(np.asarray(corner[:, i, j, :] - y[:, i, j, :])).min() > 1e-4


@pytest.mark.parametrize(("kernel_dim", "dilation"), [(1, 1), (2, 1), (1, 2), (1, 0)])
def test_sspcab_receptive_field_is_the_four_corners(kernel_dim, dilation):
  size, i, j = 11, 5, 4
  module = SSPCAB(kernel_dim=kernel_dim, dilation=dilation, reduction=4)
  x = _input((1, size, size, 4))
  variables = _init(module, x)
  grad = jax.grad(lambda v: _masked_conv(module, variables, v)[0, i, j, :].sum())(x)
  magnitude = np.abs(np.asarray(grad[0])).sum(axis=-1)
  seen = magnitude > 1e-6 * magnitude.max()
  # Rows / columns within [d + 1, d + k] of the pixel, on either side.
  near = lambda a, b: dilation + 1 <= abs(a - b) <= dilation + kernel_dim
  rows, cols = np.arange(size), np.arange(size)
  expected = np.array([[near(r, i) and near(q, j) for q in cols] for r in rows])
  assert expected.sum() == 4 * kernel_dim**2
  np.testing.assert_array_equal(seen, expected)


def test_sspcab_sows_its_reconstruction_loss():
  module = SSPCAB(reduction=4)
  x = _input()
  variables = _init(module, x)
  out, state = module.apply(variables, x, mutable=["losses"])
  (loss,) = state["losses"]["sspcab"]
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, jnp.mean((out - x) ** 2), rtol=1e-6)
  np.testing.assert_array_equal(module.apply(variables, x), out)  # immutable: nothing recorded


# ----------------------------------------------------------------------------------------------
# make_attention.


def test_make_attention():
  assert make_attention("none") is None
  for kind, cls in ATTENTIONS.items():
    module = make_attention(kind, dtype=jnp.bfloat16)
    assert type(module) is cls and module.dtype == jnp.bfloat16
  assert set(ATTENTIONS) == {"se", "eca", "cbam", "sspcab"}
  with pytest.raises(ValueError, match="bogus") as info:
    make_attention("bogus")
  for name in ["none", "se", "eca", "cbam", "sspcab"]:
    assert repr(name) in str(info.value)
