"""``conv_general_dilated`` for Flax's ``nn.Conv``, with a fast weight gradient on CPU.

XLA:CPU computes a convolution's weight gradient as a convolution with an image-sized window;
in a DMAD-PDM training step at Ped2 size that took 56% of the op time before this kernel
(``experiments/profile_train_step.py``). This drop-in for ``jax.lax.conv_general_dilated``
(pass it as ``nn.Conv(..., conv_general_dilated=ops.conv_general_dilated)``) computes the same
forward pass and input gradient with XLA, and the weight gradient with a C++ kernel
(``dmad_jax/ops/_cpu/conv_weight_grad.cc``) when compiled for CPU. The kernel covers the
convolutions this package uses: NHWC input, HWIO kernel, float32, any strides and non-negative
paddings, no dilation, one group. Everything else, and every other platform, is plain
``lax.conv_general_dilated``.

Like grid_sample's kernels, the custom call is declared to the partitioner (a batch-sharded
weight gradient is computed per device and summed with ``psum``) and has a vmap rule (one call
per mapped element). It has no higher-order derivative: differentiate through a training step
twice on CPU with ``DMAD_JAX_CPU_KERNELS=0``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dmad_jax.ops import cpu_kernels

__all__ = ["conv_general_dilated"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
  lhs,
  rhs,
  window_strides: Sequence[int],
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
):
  """``jax.lax.conv_general_dilated``, with a C++ weight gradient on CPU where it applies."""
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
  rest = (feature_group_count, batch_group_count, precision, preferred_element_type)
  pads = _kernel_case(*args, *rest)
  if pads is None:
    return lax.conv_general_dilated(*args, *rest)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision)


def _kernel_case(lhs, rhs, strides, padding, lhs_dil, rhs_dil, dn, groups, batch_groups, _,
                 preferred):  # fmt: skip
  """((ph_lo, ph_hi), (pw_lo, pw_hi)) when the kernel computes this weight gradient, else None."""
  if lhs.ndim != 4 or rhs.ndim != 4 or groups != 1 or batch_groups != 1:
    return None
  if preferred is not None or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return None
  if any(d not in (None, 1) for d in (*(lhs_dil or ()), *(rhs_dil or ()))):
    return None
  want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn) != want:
    return None
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if any(p < 0 for pair in pads for p in pair):
    return None
  if not cpu_kernels.available():
    return None
  return pads


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


def _conv_fwd(x, w, strides, pads, precision):
  return _conv(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, g):
  x, w = residuals

  def conv(x, w):
    return lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
    )

  dx = jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
  dw = jax.lax.platform_dependent(
    x,
    g,
    cpu=functools.partial(_kernel_weight_grad, w.shape, strides, pads),
    default=lambda x, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
  )
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _kernel_weight_grad(w_shape, strides, pads, x, g):
  return _weight_grad_call(tuple(w_shape), strides, (pads[0][0], pads[1][0]))(x, g)


@functools.cache
def _weight_grad_call(w_shape, strides, low_pads):
  attrs = dict(
    stride_h=np.int64(strides[0]),
    stride_w=np.int64(strides[1]),
    pad_h=np.int64(low_pads[0]),
    pad_w=np.int64(low_pads[1]),
  )

  def call(x, g):
    out = jax.ShapeDtypeStruct(w_shape, jnp.float32)
    return jax.ffi.ffi_call(cpu_kernels.target("DmadConvWeightGrad"), out)(x, g, **attrs)

  return cpu_kernels.batch_summed(call, "b h w i, b p q o -> k l i o")
