"""Where DMAD-PDM's CPU training time goes: one 3x3 convolution at Ped2 resolution, split into its
forward pass, its input gradient and its weight gradient, in JAX (XLA:CPU) and in torch (oneDNN).

  python experiments/profile_conv_backward.py [--json]

The layer is 64 -> 64 channels at 256 x 256, batch 4 (the OffsetNet trunk and the first encoder
and decoder levels of PDM are of this kind). It also times the weight gradient written as nine
shifted matmuls, one plain (64 x 262144) @ (262144 x 64) matmul, the core of that gradient, and
dmad_jax's C++ weight-gradient kernel (dmad_jax/ops/conv.py), which the package uses on CPU.
Each number is the median of 5 calls after a warm-up call.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import torch
from jax import lax
from timing import median_seconds

from dmad_jax.ops import conv as dmad_conv
from dmad_jax.ops import cpu_kernels


def _median_s(fn, *args, repeats=5):
  return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def _torch_median_s(fn, repeats=5):
  return median_seconds(fn, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  n, s, c = 4, 256, 64
  flops = 2 * n * s * s * c * c * 9
  x = jax.random.normal(jax.random.key(0), (n, s, s, c))
  w = jax.random.normal(jax.random.key(1), (3, 3, c, c)) * 0.05

  def conv(x, w):
    dn = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

  g = conv(x, w)
  fwd = jax.jit(conv)
  grad_x = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  grad_w = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])

  def grad_w_matmuls(x, g):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dims = (((0,), (0,)), ((), ()))
    return jnp.stack(
      [
        lax.dot_general(xp[:, i : i + s, j : j + s, :].reshape(-1, c), g.reshape(-1, c), dims)
        for i in range(3)
        for j in range(3)
      ]
    ).reshape(3, 3, c, c)

  a = x.reshape(-1, c)
  res = {
    "jax_forward_s": _median_s(fwd, x, w),
    "jax_grad_input_s": _median_s(grad_x, x, w, g),
    "jax_grad_weight_s": _median_s(grad_w, x, w, g),
    "jax_grad_weight_as_9_matmuls_s": _median_s(jax.jit(grad_w_matmuls), x, g),
    "jax_one_matmul_64x262144x64_s": _median_s(jax.jit(lambda a, b: a.T @ b), a, a),
  }
  if cpu_kernels.available():  # dmad_jax's C++ weight gradient (what the package uses on CPU)
    kernel = jax.jit(
      lambda x, g: dmad_conv._kernel_weight_grad(w.shape, (1, 1), ((1, 1), (1, 1)), x, g)
    )
    res["dmad_kernel_grad_weight_s"] = _median_s(kernel, x, g)
  xt = torch.randn(n, c, s, s)
  conv_t = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
  gt = torch.randn(n, c, s, s)
  res["torch_forward_s"] = _torch_median_s(lambda: conv_t(xt))
  res["torch_grad_input_s"] = _torch_median_s(
    lambda: torch.nn.grad.conv2d_input(xt.shape, conv_t.weight, gt, padding=1)
  )
  res["torch_grad_weight_s"] = _torch_median_s(
    lambda: torch.nn.grad.conv2d_weight(xt, conv_t.weight.shape, gt, padding=1)
  )
  at = torch.randn(n * s * s, c)
  res["torch_one_matmul_64x262144x64_s"] = _torch_median_s(lambda: at.T @ at)
  res["gflop_per_conv"] = flops / 1e9
  if args.json:
    print(json.dumps(res))
    return
  for k, v in res.items():
    if not k.endswith("_s"):
      continue
    work = flops / 9 if "matmul" in k and "9_matmuls" not in k else flops
    print(f"{k:36s} {v * 1e3:8.1f} ms  {work / v / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
  main()
