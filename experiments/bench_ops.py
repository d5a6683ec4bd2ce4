"""Times dmad_jax's core ops against PyTorch in the same process, on this machine's CPU.

  python experiments/bench_ops.py [--repeats 30] [--json]
  DMAD_JAX_CPU_KERNELS=0 python experiments/bench_ops.py   # grid_sample without the C++ kernels

* grid_sample (bilinear, zeros, align_corners=True), forward and forward+backward (gradients
  with respect to the image and the grid), at (4, 256, 256, 3) and (8, 64, 64, 64), for two
  kinds of grid: ``random`` (uniform in [-1.1, 1.1]: scattered memory access, the worst case)
  and ``dmad`` (identity plus offsets of up to 3 pixels, clamped: what DMAD's warps sample).
* vector quantisation at (8, 32, 32, 256) x K=1000, forward and forward+backward, against the
  official VQ layer's formulation written in torch (matmul distances, argmin, both losses,
  straight-through output).

Each number is the median wall time of ``--repeats`` calls after one warm-up call (which also
compiles the JAX function). Ratios are torch / jax: above 1 means dmad_jax is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import torch
from timing import median_seconds

from dmad_jax.ops import cpu_kernels
from dmad_jax.ops.quantize import vector_quantize
from dmad_jax.ops.sampling import grid_sample, identity_grid


def _median_ms(fn, repeats):
  return median_seconds(fn, repeats) * 1e3


def _make_grid(kind, n, h, w, rng):
  if kind == "random":
    return rng.uniform(-1.1, 1.1, (n, h, w, 2)).astype(np.float32)
  offsets = rng.uniform(-3.0, 3.0, (n, h, w, 2)) * 2.0 / (np.array([w, h]) - 1)
  return np.clip(np.asarray(identity_grid(n, h, w)) + offsets, -1, 1).astype(np.float32)


def bench_grid_sample(shape, kind, repeats):
  rng = np.random.default_rng(0)
  n, h, w, c = shape
  x = rng.standard_normal(shape).astype(np.float32)
  grid = _make_grid(kind, n, h, w, rng)
  xj, gj = jnp.asarray(x), jnp.asarray(grid)

  fwd = jax.jit(grid_sample)
  fwd_bwd = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(grid_sample(a, b) ** 2), (0, 1)))
  xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
  gt = torch.tensor(grid).requires_grad_(True)

  def torch_fwd():
    with torch.no_grad():
      torch.nn.functional.grid_sample(xt, gt, align_corners=True)

  def torch_fwd_bwd():
    xt.grad = gt.grad = None
    out = torch.nn.functional.grid_sample(xt, gt, align_corners=True)
    (out**2).sum().backward()

  return {
    "op": "grid_sample",
    "shape": list(shape),
    "grid": kind,
    "jax_fwd_ms": _median_ms(lambda: jax.block_until_ready(fwd(xj, gj)), repeats),
    "torch_fwd_ms": _median_ms(torch_fwd, repeats),
    "jax_fwd_bwd_ms": _median_ms(lambda: jax.block_until_ready(fwd_bwd(xj, gj)), repeats),
    "torch_fwd_bwd_ms": _median_ms(torch_fwd_bwd, repeats),
  }


def _torch_vq(z, codebook, beta=0.25):
  """The official VQ layer's arithmetic (NHWC flattened), as a torch reference."""
  flat = z.reshape(-1, z.shape[-1])
  d = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * flat @ codebook.t()
  idx = d.argmin(1)
  q = codebook[idx].view_as(z)
  commitment = beta * torch.mean((q.detach() - z) ** 2)
  embedding = torch.mean((q - z.detach()) ** 2)
  return z + (q - z).detach(), commitment + embedding


def bench_vq(shape, num_codes, repeats):
  rng = np.random.default_rng(0)
  z = rng.standard_normal(shape).astype(np.float32)
  cb = rng.uniform(-1 / num_codes, 1 / num_codes, (num_codes, shape[-1])).astype(np.float32)
  zj, cj = jnp.asarray(z), jnp.asarray(cb)

  def loss(z, cb):
    q, aux = vector_quantize(z, cb)
    return jnp.sum(q**2) + aux.codebook_loss + aux.commitment_loss

  fwd = jax.jit(lambda z, cb: vector_quantize(z, cb)[0])
  fwd_bwd = jax.jit(jax.value_and_grad(loss, (0, 1)))
  zt = torch.tensor(z).requires_grad_(True)
  ct = torch.tensor(cb).requires_grad_(True)

  def torch_fwd():
    with torch.no_grad():
      _torch_vq(zt, ct)

  def torch_fwd_bwd():
    zt.grad = ct.grad = None
    q, vq_loss = _torch_vq(zt, ct)
    ((q**2).sum() + vq_loss).backward()

  return {
    "op": "vector_quantize",
    "shape": list(shape),
    "num_codes": num_codes,
    "jax_fwd_ms": _median_ms(lambda: jax.block_until_ready(fwd(zj, cj)), repeats),
    "torch_fwd_ms": _median_ms(torch_fwd, repeats),
    "jax_fwd_bwd_ms": _median_ms(lambda: jax.block_until_ready(fwd_bwd(zj, cj)), repeats),
    "torch_fwd_bwd_ms": _median_ms(torch_fwd_bwd, repeats),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--json", action="store_true", help="print one JSON object instead")
  args = parser.parse_args()

  rows = []
  for shape in [(4, 256, 256, 3), (8, 64, 64, 64)]:
    for kind in ["random", "dmad"]:
      rows.append(bench_grid_sample(shape, kind, args.repeats))
  rows.append(bench_vq((8, 32, 32, 256), 1000, args.repeats))
  for r in rows:
    r["ratio_fwd"] = r["torch_fwd_ms"] / r["jax_fwd_ms"]
    r["ratio_fwd_bwd"] = r["torch_fwd_bwd_ms"] / r["jax_fwd_bwd_ms"]
  machine = {
    "cpu": platform.processor() or platform.machine(),
    "cores": os.cpu_count(),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    # False with DMAD_JAX_CPU_KERNELS=0 (or without a C++ compiler): the pure-XLA grid_sample.
    "grid_sample_cpu_kernels": cpu_kernels.available(),
  }
  if args.json:
    print(json.dumps({"machine": machine, "results": rows}))
    return
  print(f"machine: {machine}")
  header = f"{'op':16s} {'shape':18s} {'grid':7s} {'fwd jax/torch ms':>20s} {'ratio':>6s} "
  header += f"{'fwd+bwd jax/torch ms':>22s} {'ratio':>6s}"
  print(header)
  for r in rows:
    shape = "x".join(map(str, r["shape"])) + (f" K={r['num_codes']}" if "num_codes" in r else "")
    print(
      f"{r['op']:16s} {shape:18s} {r.get('grid', '-'):7s} "
      f"{r['jax_fwd_ms']:9.2f} /{r['torch_fwd_ms']:8.2f} {r['ratio_fwd']:6.2f} "
      f"{r['jax_fwd_bwd_ms']:11.2f} /{r['torch_fwd_bwd_ms']:8.2f} {r['ratio_fwd_bwd']:6.2f}"
    )
  print("ratio = torch time / jax time (> 1: dmad_jax faster)")


if __name__ == "__main__":
  main()
