"""ops.conv_general_dilated: lax's convolution with a C++ weight gradient on CPU.

The forward pass is lax's own (bit-identical), and so is the input gradient of a stride-1
convolution; a strided one's input gradient is computed by output phases (``lhs_dilated_conv``,
tests/ops/conv_transpose_test.py) and the weight gradient by the C++ kernel: both agree with
XLA's to float32 summation-order rounding, for every stride/padding/channel shape
the kernel's code paths distinguish (64/32/16-wide and leftover column tiles, the transposed
path for few output channels, asymmetric padding, 1x1 and even kernels). Cases the kernel does
not cover fall back to lax.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dmad_jax import nn as dnn
from dmad_jax.ops import conv, cpu_kernels

DN = ("NHWC", "HWIO", "NHWC")

CASES = [
  # (batch, size, kernel, ci, co, stride, padding)
  (2, 9, 3, 5, 7, 1, ((1, 1), (1, 1))),
  (2, 10, 3, 3, 20, 2, ((1, 1), (1, 1))),
  (2, 11, 3, 6, 17, 2, ((1, 2), (1, 2))),
  (1, 12, 1, 3, 20, 1, ((0, 0), (0, 0))),
  (2, 8, 3, 4, 5, 1, "SAME"),
  (2, 9, 4, 4, 5, 2, "SAME"),
  (2, 9, 3, 4, 5, 1, "VALID"),
  (2, 9, 3, 64, 2, 1, ((1, 1), (1, 1))),  # few output channels: transposed tiles
  (2, 9, 3, 33, 3, 1, ((1, 1), (1, 1))),
  (1, 16, 3, 12, 96, 1, ((1, 1), (1, 1))),  # 64 + 32 column tiles
  (2, 7, 3, 9, 80, 2, ((2, 0), (0, 2))),  # 64 + 16 column tiles, one-sided padding
  (1, 6, 5, 6, 67, 1, ((2, 2), (2, 2))),  # leftover columns
]


def _loss(fn, stride, padding):
  def loss(x, w):
    y = fn(x, w, (stride, stride), padding, dimension_numbers=DN)
    return jnp.sum(jnp.sin(y))

  return loss


@pytest.mark.parametrize("n,s,k,ci,co,stride,padding", CASES)
def test_matches_lax_in_value_and_both_gradients(n, s, k, ci, co, stride, padding):
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, s, s, ci)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((k, k, ci, co)).astype(np.float32) * 0.2)
  ours = jax.jit(jax.value_and_grad(_loss(conv.conv_general_dilated, stride, padding), (0, 1)))
  ref = jax.jit(jax.value_and_grad(_loss(lax.conv_general_dilated, stride, padding), (0, 1)))
  assert "dmad_conv_weight_grad" in ours.lower(x, w).compile().as_text()
  (v, (gx, gw)), (rv, (rgx, rgw)) = ours(x, w), ref(x, w)
  np.testing.assert_array_equal(v, rv)
  if stride == 1:
    np.testing.assert_array_equal(gx, rgx)
  else:
    np.testing.assert_allclose(gx / np.abs(rgx).max(), rgx / np.abs(rgx).max(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(gw / np.abs(rgw).max(), rgw / np.abs(rgw).max(), rtol=0, atol=2e-6)


def test_other_convolutions_are_plain_lax():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)).astype(np.float32))
  cases = {
    "bfloat16": (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), {}),
    "dilation": (x, w, {"rhs_dilation": (2, 2)}),
    "groups": (x, w[:, :, :2], {"feature_group_count": 2}),
    "NCHW": (x.transpose(0, 3, 1, 2), w, {"dimension_numbers": ("NCHW", "HWIO", "NCHW")}),
  }
  for name, (a, b, kw) in cases.items():
    kw = {"dimension_numbers": DN, **kw}

    def loss(a, b, kw=kw):
      return jnp.sum(conv.conv_general_dilated(a, b, (1, 1), "SAME", **kw) ** 2)

    def ref(a, b, kw=kw):
      return jnp.sum(lax.conv_general_dilated(a, b, (1, 1), "SAME", **kw) ** 2)

    f = jax.jit(jax.grad(loss, (0, 1)))
    assert "dmad_conv_weight_grad" not in f.lower(a, b).compile().as_text(), name
    for got, want in zip(f(a, b), jax.grad(ref, (0, 1))(a, b), strict=True):
      np.testing.assert_array_equal(got, want, err_msg=name)


def test_under_vmap_each_element_gets_its_own_weight_gradient():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 4)).astype(np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 5)).astype(np.float32))
  got = jax.jit(jax.vmap(jax.grad(_loss(conv.conv_general_dilated, 1, "SAME"), (0, 1))))(x, w)
  want = jax.vmap(jax.grad(_loss(lax.conv_general_dilated, 1, "SAME"), (0, 1)))(x, w)
  np.testing.assert_allclose(got[0], want[0], atol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_fast_conv_is_nn_conv_with_the_kernel():
  """Same parameter tree and forward pass as nn.Conv; gradients to rounding."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 3)).astype(np.float32))
  fast = dnn.FastConv(8, (3, 3), strides=2, padding=1)
  plain = nn.Conv(8, (3, 3), strides=2, padding=1)
  params = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(fast.init(jax.random.key(0), x)) == jax.tree.structure(params)
  np.testing.assert_array_equal(fast.apply(params, x), plain.apply(params, x))

  def grads(module):
    return jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2)))(params)

  for a, b in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(plain)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
