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
from jax.ad_checkpoint import checkpoint_name

from dmad_jax.ops import cpu_kernels

__all__ = ["CONV_OUTPUT", "conv_general_dilated", "conv_transpose", "lhs_dilated_conv"]

_NHWC = ("NHWC", "HWIO", "NHWC")
# The name every convolution output here carries (``jax.ad_checkpoint.checkpoint_name``): a
# rematerialisation policy that saves only these recomputes the cheap elementwise layers between
# convolutions in the backward pass (``dmad_jax.nn.remat``). Without a policy it is the identity.
CONV_OUTPUT = "conv_output"


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
    return checkpoint_name(lax.conv_general_dilated(*args, *rest), CONV_OUTPUT)
  strides = tuple(int(s) for s in window_strides)

  def plain(x, w):
    return lax.conv_general_dilated(
      x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
    )

  def cpu(x, w):
    if not cpu_kernels.available():
      return plain(x, w)
    return _conv(x, w, strides, pads, precision)

  return checkpoint_name(cpu_kernels.by_platform(cpu, plain, lhs, rhs), CONV_OUTPUT)


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

  dx = _input_grad(x.shape, w, strides, pads, precision, g)
  if dx is None:
    dx = jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
  # _conv only runs in the CPU branch of conv_general_dilated, with the kernels built.
  dw = _kernel_weight_grad(w.shape, strides, pads, x, g)
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


# ---------------------------------------------------------------------------------------------
# Convolutions of a zero-interleaved input (transposed convolutions, strided-conv gradients).
# ---------------------------------------------------------------------------------------------
def _dim_phases(size: int, k: int, s: int, lo: int, hi: int):
  """One spatial axis of ``lhs_dilated_conv``: (outputs per phase, [(first tap, taps, pad_lo,
  pad_hi) per output phase r]), or None when the phases do not all have the same length.

  Output o = s*m + r sums w[k] * x[(o + k - lo) / s] over the taps with (o + k - lo) divisible
  by s: k = k0 + s*t with k0 = (lo - r) mod s, reading x[m + c + t] with c = (r + k0 - lo) / s.
  That is a stride-1 convolution of x with the sub-kernel w[k0::s] and padding (-c, ...).
  """
  out = (size - 1) * s + 1 + lo + hi - k + 1
  if lo < 0 or hi < 0 or out <= 0 or out % s:
    return None
  m = out // s
  phases = []
  for r in range(s):
    k0 = (lo - r) % s
    taps = max(0, -(-(k - k0) // s))
    c = (r + k0 - lo) // s
    phases.append((k0, taps, -c, m + c + taps - 1 - size))
  return m, phases


def lhs_dilated_conv(x, w, dilation: Sequence[int], pads, precision=None):
  """``lax.conv_general_dilated(x, w, (1, 1), pads, lhs_dilation=dilation)`` for NHWC ``x`` and
  HWIO ``w``, computed as one stride-1 convolution per output phase.

  A convolution of an input with ``s - 1`` zeros between its pixels (a transposed convolution,
  or the input gradient of a stride-``s`` convolution) spends ``(s**2 - 1) / s**2`` of its
  multiply-adds on those zeros, and XLA:CPU runs it as a generic loop nest rather than its fast
  convolution library (it took 60-80% of a DMAD-PDM training step at Ped2 size on CPU,
  ``experiments/profile_train_step.py``). Output pixel ``o = s*m + r`` only meets the taps
  ``k = (lo - r) mod s + s*t``, so each output phase ``r`` is a stride-1 convolution of the
  un-dilated input with a sub-kernel; the phases are interleaved into the output. Same values up
  to float summation order; every platform. Falls back to ``lax`` where the phases differ in
  length (an output size not divisible by the dilation) or a padding is negative.
  """
  dilation = tuple(int(d) for d in dilation)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  plans = [_dim_phases(x.shape[1 + i], w.shape[i], dilation[i], *pads[i]) for i in range(2)]
  if any(p is None for p in plans) or x.ndim != 4 or w.ndim != 4:
    return lax.conv_general_dilated(
      x, w, (1, 1), pads, lhs_dilation=dilation, dimension_numbers=_NHWC, precision=precision
    )
  (mh, ph), (mw, pw) = plans
  rows = []
  for k0h, th, loh, hih in ph:
    row = []
    for k0w, tw, low, hiw in pw:
      if th == 0 or tw == 0:
        row.append(jnp.zeros((x.shape[0], mh, mw, w.shape[3]), jnp.result_type(x, w)))
        continue
      sub = w[
        k0h : k0h + dilation[0] * th : dilation[0], k0w : k0w + dilation[1] * tw : dilation[1]
      ]
      # Negative pads crop the input; the positive ones go to the convolution.
      xi = x[:, max(0, -loh) : x.shape[1] - max(0, -hih), max(0, -low) : x.shape[2] - max(0, -hiw)]
      conv_pads = ((max(0, loh), max(0, hih)), (max(0, low), max(0, hiw)))
      row.append(
        conv_general_dilated(
          xi, sub, (1, 1), conv_pads, dimension_numbers=_NHWC, precision=precision
        )
      )
    rows.append(jnp.stack(row, axis=3))  # (N, Mh, Mw, s_w, C)
  out = jnp.stack(rows, axis=2)  # (N, Mh, s_h, Mw, s_w, C)
  n, _, _, _, _, c = out.shape
  return out.reshape(n, mh * dilation[0], mw * dilation[1], c)


def conv_transpose(x, kernel, strides: Sequence[int], pads, precision=None):
  """``lax.conv_transpose(x, kernel, strides, pads, transpose_kernel=True)`` (Flax's
  ``ConvTranspose(transpose_kernel=True)``, torch's ``ConvTranspose2d``) for NHWC ``x`` and a
  kernel of shape ``(kh, kw, out_features, in_features)``: on CPU by ``lhs_dilated_conv`` (one
  stride-1 convolution per output phase), elsewhere by ``lax.conv_transpose`` itself."""
  strides = tuple(int(s) for s in strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)

  def phases(x, kernel):
    w = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    return lhs_dilated_conv(x, w, strides, pads, precision)

  def plain(x, kernel):
    return lax.conv_transpose(
      x, kernel, strides, pads, dimension_numbers=_NHWC, transpose_kernel=True, precision=precision
    )

  return checkpoint_name(cpu_kernels.by_platform(phases, plain, x, kernel), CONV_OUTPUT)


def _input_grad(x_shape, w, strides, pads, precision, g):
  """The input gradient of a strided ``_conv`` as ``lhs_dilated_conv`` of ``g``, or None where
  that does not apply (stride 1: XLA's own transpose is already a plain convolution)."""
  if all(s == 1 for s in strides):
    return None
  grad_pads = []
  for i in range(2):
    size, k, s, (lo, _) = x_shape[1 + i], w.shape[i], strides[i], pads[i]
    n_out = g.shape[1 + i]
    grad_pads.append((k - 1 - lo, size - 1 + lo - (n_out - 1) * s))
  if any(p < 0 for pair in grad_pads for p in pair):
    return None
  if any(_dim_phases(g.shape[1 + i], w.shape[i], strides[i], *grad_pads[i]) is None
         for i in range(2)):  # fmt: skip
    return None
  w_t = jnp.swapaxes(w[::-1, ::-1], 2, 3)
  return lhs_dilated_conv(g, w_t, strides, grad_pads, precision)
