"""Convolutions of a zero-interleaved input by output phases: ``ops.conv.lhs_dilated_conv``,
``conv_transpose`` and ``nn.FastConvTranspose`` against lax, Flax and torch.

Each output phase is a stride-1 convolution with a sub-kernel, so the values and gradients equal
lax's up to float32 summation order, and the compiled program has no convolution over a dilated
input left (the slow XLA:CPU loop nest this replaces).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from dmad_jax.nn.fast_conv import FastConvTranspose
from dmad_jax.ops import conv

DN = ("NHWC", "HWIO", "NHWC")

CASES = [
  # (height, width, kernel, dilation, pad_lo, pad_hi)
  (8, 8, 3, 2, 1, 2),  # DMAD's upsampling: ConvTranspose2d(k3, s2, p1, output_padding 1)
  (7, 9, 3, 2, 1, 2),
  (8, 6, 2, 2, 1, 1),  # even kernel
  (5, 5, 3, 3, 2, 2),  # dilation 3
  (8, 8, 1, 2, 0, 1),  # 1x1: one phase has no taps
  (6, 6, 3, 2, 2, 3),
  (6, 6, 5, 2, 4, 5),
  (6, 6, 4, 2, 0, 3),  # odd output size: phases of unequal length, lax fallback
]


def _max_rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("h,w,k,s,lo,hi", CASES)
def test_values_and_gradients_match_lax(h, w, k, s, lo, hi):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, h, w, 3)), jnp.float32)
  wt = jnp.asarray(rng.standard_normal((k, k, 4, 3)), jnp.float32)
  pads = ((lo, hi), (lo, hi))

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda x, wt: jnp.sum(jnp.sin(fn(x, wt))), (0, 1)))

  ours = loss(lambda x, wt: conv.conv_transpose(x, wt, (s, s), pads))
  ref = loss(lambda x, wt: lax.conv_transpose(x, wt, (s, s), pads, transpose_kernel=True))
  (v, grads), (rv, rgrads) = ours(x, wt), ref(x, wt)
  assert v == pytest.approx(float(rv), rel=1e-5)
  for g, rg in zip(grads, rgrads, strict=True):
    assert _max_rel(g, rg) < 2e-6
  y = conv.lhs_dilated_conv(x, jnp.swapaxes(wt, 2, 3), (s, s), pads)
  ry = lax.conv_general_dilated(
    x, jnp.swapaxes(wt, 2, 3), (1, 1), pads, lhs_dilation=(s, s), dimension_numbers=DN
  )
  assert y.shape == ry.shape and _max_rel(y, ry) < 2e-6
  hlo = ours.lower(x, wt).compile().as_text()
  dilated = [line for line in hlo.splitlines() if "convolution(" in line and "lhs_dilate" in line]
  if all(((n - 1) * s + 2 + lo + hi - k) % s == 0 for n in (h, w)):
    assert not dilated, dilated  # phases of equal length: no dilated convolution left
  else:
    assert dilated  # the lax fallback


def test_fast_conv_transpose_is_flax_conv_transpose_and_torch_conv_transpose2d():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 7)), jnp.float32)
  kw = dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding=((1, 2), (1, 2)))
  fast = FastConvTranspose(**kw, use_bias=True)
  flax_ct = nn.ConvTranspose(**kw, use_bias=True, transpose_kernel=True)
  variables = flax_ct.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, fast.init(jax.random.PRNGKey(0), x)) == jax.tree.map(
    jnp.shape, variables
  )
  variables = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape)), variables)
  y = fast.apply(variables, x)
  assert _max_rel(y, flax_ct.apply(variables, x)) < 2e-6
  # torch: ConvTranspose2d(7, 4, 3, stride 2, padding 1, output_padding 1), weight (in, out, k, k).
  t = torch.nn.ConvTranspose2d(7, 4, 3, stride=2, padding=1, output_padding=1)
  with torch.no_grad():
    t.weight.copy_(torch.from_numpy(np.array(variables["params"]["kernel"]).transpose(3, 2, 0, 1)))
    t.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
    ty = t(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  assert y.shape == (2, 10, 12, 4) and _max_rel(y, ty) < 2e-6


def test_strided_convolution_input_gradient_has_no_dilated_convolution():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 5)), jnp.float32)
  wt = jnp.asarray(rng.standard_normal((3, 3, 5, 6)), jnp.float32)

  def loss(fn):
    return jax.jit(
      jax.grad(
        lambda x, wt: jnp.sum(jnp.sin(fn(x, wt, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN)))
      )
    )

  ours, ref = loss(conv.conv_general_dilated), loss(lax.conv_general_dilated)
  assert _max_rel(ours(x, wt), ref(x, wt)) < 2e-6
  assert "lhs_dilate" in ref.lower(x, wt).compile().as_text()
  assert "lhs_dilate" not in ours.lower(x, wt).compile().as_text()
