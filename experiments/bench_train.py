"""DMAD-PDM at Ped2 size (256x256, 12 -> 3 channels, 200 codes): train and eval step speed.

  python experiments/bench_train.py [--repeats 5] [--json]

Cases: train step at batch 1 and 4 (AdamW, donated state, the official Ped2 loss), eval step
(forward + anomaly maps + scores) at batch 1. For each: median seconds per step, compile seconds,
FLOPs per step from XLA's cost analysis, achieved GFLOP/s, its ratio to a float32 matmul peak
measured in the same run, and the peak resident memory of a process that ran only that case.
Each case runs in its own subprocess so that peak RSS is per case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {"train_b1": ("train", 1), "train_b4": ("train", 4), "eval_b1": ("eval", 1)}
# The official PyTorch model measured on this machine (2 CPU cores), from the issue tracker.
TORCH_REFERENCE_S = {"train_b1": 0.69, "train_b4": 4.34, "eval_b1": 0.28}


def _matmul_peak_gflops(n=2048, repeats=10):
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / min(times) / 1e9


def _ped2_config():
  """The official Ped2 settings (configs/ped2_pdm.py); its data keys are not used here."""
  sys.path.insert(0, os.path.dirname(HERE))
  from configs import ped2_pdm

  return ped2_pdm.get_config("root=unused")


def _xla_flops(step, args):
  """FLOPs of the step from XLA's cost analysis, counted on the pure-XLA program: XLA cannot see
  into dmad_jax's CPU kernels (custom calls), so the step that uses them would count fewer."""
  import jax

  from dmad_jax.ops import cpu_kernels

  available = cpu_kernels.available
  cpu_kernels.available = lambda: False
  try:
    # A new function object, so that jit traces again instead of reusing the kernel trace.
    cost = jax.jit(lambda *a: step(*a)).lower(*args).compile().cost_analysis()
  finally:
    cpu_kernels.available = available
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def run_case(name, repeats):
  import functools

  import jax

  from dmad_jax.models import get_detector
  from dmad_jax.train.optim import learning_rate_schedule
  from dmad_jax.train.state import variables_of
  from dmad_jax.train.trainer import make_state, train_step

  kind, batch = CASES[name]
  config = _ped2_config()
  detector = get_detector(config)
  rng = np.random.default_rng(0)
  data = {"frames": rng.uniform(-1, 1, (batch, 256, 256, 15)).astype(np.float32)}
  state = make_state(config, detector, data, 1000)
  if kind == "train":
    step = functools.partial(
      train_step,
      detector=detector,
      lr_schedule=learning_rate_schedule(config.optimizer, 1000),
    )
    fn = jax.jit(step, donate_argnums=0)
    args = (state, data)
  else:
    step = detector.predict
    fn = jax.jit(step)
    args = (variables_of(state), data)
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  flops = _xla_flops(step, args)
  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    out = compiled(*args)
    if kind == "train":
      args = (out[0], data)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  median = float(np.median(times[1:]))  # the first call also pays for allocations
  return {
    "case": name,
    "batch": batch,
    "median_s": median,
    "compile_s": compile_s,
    "gflop_per_step": flops / 1e9,
    "gflops_per_s": flops / median / 1e9,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:  # child process: one case, one JSON line
    print(json.dumps(run_case(args.case, args.repeats)))
    return
  peak = _matmul_peak_gflops()
  rows = []
  for name in CASES:
    out = subprocess.run(
      [sys.executable, __file__, "--case", name, "--repeats", str(args.repeats)],
      capture_output=True,
      text=True,
      check=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak
    row["torch_reference_s"] = TORCH_REFERENCE_S[name]
    row["speedup_vs_torch"] = TORCH_REFERENCE_S[name] / row["median_s"]
    rows.append(row)
  result = {
    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    "matmul_peak_gflops": peak,
    "results": rows,
  }
  if args.json:
    print(json.dumps(result))
    return
  print(f"machine: {result['machine']}  float32 matmul peak: {peak:.1f} GFLOP/s")
  print(
    f"{'case':9s} {'s/step':>8s} {'compile s':>9s} {'GFLOP':>8s} {'GFLOP/s':>8s} "
    f"{'of peak':>7s} {'RSS GiB':>7s} {'torch s':>7s} {'speedup':>7s}"
  )
  for r in rows:
    print(
      f"{r['case']:9s} {r['median_s']:8.3f} {r['compile_s']:9.1f} {r['gflop_per_step']:8.1f} "
      f"{r['gflops_per_s']:8.1f} {r['fraction_of_matmul_peak']:7.2f} {r['peak_rss_gib']:7.2f} "
      f"{r['torch_reference_s']:7.2f} {r['speedup_vs_torch']:7.2f}"
    )


if __name__ == "__main__":
  main()
