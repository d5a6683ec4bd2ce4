"""DMAD-PDM at Ped2 size (256x256, 12 -> 3 channels, 200 codes): train and eval step speed.

  python experiments/bench_train.py [--repeats 5] [--rounds 3] [--no-torch] [--cases A,B]
                                    [--json [--out FILE]]

``--json`` prints the result as JSON and stores it in experiments/results/bench_train.json (or
``--out``).

Cases: train step at batch 1 and 4 (AdamW, donated state, the official Ped2 loss), eval step
(forward + anomaly maps + scores) at batch 1, each set up as ``dmad train`` does: the state
created by one jitted program, the step compiled ahead with the CPU compiler's
memory-minimising scheduler, and the host memory freed by building them returned to the OS
(``dmad_jax.train.host_memory``). ``train_b4_no_release`` is the batch-4 step without either,
as the trainer ran before them; ``train_b4_remat`` the batch-4 step with
``config.remat = "conv_outputs"``. For each: median seconds per step, compile seconds, FLOPs per
step from XLA's cost analysis (counted in a separate process, so that its compilation does not
count in the case's memory), achieved GFLOP/s, its ratio to a float32 matmul peak measured in
the same run, XLA's temporary buffers of the step (``memory_analysis``) and the peak resident
memory of a process that ran only that case. Each case runs in its own subprocess so that peak
RSS is per case.

The first three cases also run on the PyTorch twin of the model (experiments/torch_pdm.py, whose
outputs, loss and gradients tests/models/pdm_torch_twin_test.py checks against this one), in the
same run, so that the speed ratio does not depend on how fast the machine is that day;
``--no-torch`` skips it. The official PyTorch model's times from the issue tracker are kept next
to them for reference (``torch_reference_s``).
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
CASES = {
  "train_b1": ("train", 1),
  "train_b4": ("train", 4),
  "eval_b1": ("eval", 1),
  # The trainer before it returned freed host memory (host_memory.release), in the same run.
  "train_b4_no_release": ("train", 4),
  # config.remat = "conv_outputs" (dmad_jax.nn.remat).
  "train_b4_remat": ("train", 4),
}
# The official PyTorch model measured on this machine (2 CPU cores), from the issue tracker, on a
# day when its float32 matmul peak measured about 475 GFLOP/s.
TORCH_REFERENCE_S = {"train_b1": 0.69, "train_b4": 4.34, "eval_b1": 0.28}
TWIN_CASES = ("train_b1", "train_b4", "eval_b1")  # the PyTorch twin runs these


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
  from dmad_jax.configs import load

  return load(os.path.join(os.path.dirname(HERE), "configs", "ped2_pdm.py"), "root=unused")


def _case_config(name):
  config = _ped2_config()
  if name.endswith("_remat"):
    config.remat = "conv_outputs"
  return config


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
  """One case, set up as ``dmad train`` does: the state created by one jitted program, the step
  traced for the devices and compiled ahead with the CPU compiler's memory-minimising scheduler
  (set by ``main`` before JAX starts), and the host memory their building freed returned to the
  OS (``host_memory.release``) before the first step; the ``_no_release`` variant is the trainer
  before these two (the default scheduler, no release)."""
  import functools

  import jax

  from dmad_jax import data as data_lib
  from dmad_jax.models import get_detector
  from dmad_jax.ops import cpu_kernels
  from dmad_jax.train import host_memory
  from dmad_jax.train import state as state_lib
  from dmad_jax.train.optim import learning_rate_schedule
  from dmad_jax.train.state import variables_of
  from dmad_jax.train.trainer import train_step

  kind, batch = CASES[name]
  release = not name.endswith("_no_release")
  config = _case_config(name)
  detector = get_detector(config)
  rng = np.random.default_rng(0)
  data = {"frames": rng.uniform(-1, 1, (batch, 256, 256, 15)).astype(np.float32)}
  spec = data_lib.element_spec(config.data)
  tx = state_lib.optimizer(config, detector, spec, 1000)
  devices = jax.local_devices()
  create = functools.partial(state_lib.create, config, detector, spec, tx)
  state = jax.jit(cpu_kernels.traced_for_devices(create, devices))()
  if release:
    host_memory.release()
  if kind == "train":
    step = functools.partial(
      train_step,
      detector=detector,
      lr_schedule=learning_rate_schedule(config.optimizer, 1000),
    )
    fn = jax.jit(cpu_kernels.traced_for_devices(step, devices), donate_argnums=0)
    args = (state, data)
  else:
    fn = jax.jit(cpu_kernels.traced_for_devices(detector.predict, devices))
    args = (variables_of(state), data)
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  if release:
    host_memory.release()
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
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "temp_buffers_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
  }


def case_flops(name):
  """FLOPs of one step of a case from XLA's cost analysis, in a process of its own (a second
  compilation would otherwise count in the case's peak memory)."""
  import functools

  import jax

  from dmad_jax import data as data_lib
  from dmad_jax.models import get_detector
  from dmad_jax.train import state as state_lib
  from dmad_jax.train.optim import learning_rate_schedule
  from dmad_jax.train.state import variables_of
  from dmad_jax.train.trainer import train_step

  kind, batch = CASES[name]
  config = _case_config(name)
  detector = get_detector(config)
  spec = data_lib.element_spec(config.data)
  state = state_lib.abstract(config, detector, spec)
  data = {"frames": jax.ShapeDtypeStruct((batch, 256, 256, 15), np.float32)}
  if kind == "train":
    step = functools.partial(
      train_step, detector=detector, lr_schedule=learning_rate_schedule(config.optimizer, 1000)
    )
    return {"case": name, "flops": _xla_flops(step, (state, data))}
  return {"case": name, "flops": _xla_flops(detector.predict, (variables_of(state), data))}


def run_torch_case(name, repeats):
  """The case on experiments/torch_pdm.py: median seconds, FLOPs (torch's counter), peak RSS."""
  import torch
  from torch.utils.flop_counter import FlopCounterMode

  sys.path.insert(0, HERE)
  import torch_pdm

  kind, batch = CASES[name]
  torch.manual_seed(0)
  model = torch_pdm.TorchPDM()
  optimizer = torch_pdm.make_optimizer(model)
  rng = np.random.default_rng(0)
  frames = torch.from_numpy(rng.uniform(-1, 1, (batch, 15, 256, 256)).astype(np.float32))
  if kind == "train":
    step = lambda: torch_pdm.train_step(model, optimizer, frames)  # noqa: E731
  else:
    step = lambda: torch_pdm.eval_step(model, frames)  # noqa: E731
  with FlopCounterMode(display=False) as counter:
    step()
  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  median = float(np.median(times[1:]))
  flops = counter.get_total_flops()
  return {
    "case": name,
    "median_s": median,
    "gflop_per_step": flops / 1e9,
    "gflops_per_s": flops / median / 1e9,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "threads": torch.get_num_threads(),
    "version": torch.__version__,
  }


def _child(name, repeats, framework):
  out = subprocess.run(
    [sys.executable, __file__, "--case", name, "--repeats", str(repeats), "--framework", framework],
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _flops_child(name):
  out = subprocess.run(
    [sys.executable, __file__, "--case", name, "--framework", "flops"],
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])["flops"]


def _summary(runs):
  """One row from several runs of a case: the median of their medians, the largest RSS, the
  first run's other fields, and every run's median as ``round_medians_s``."""
  row = dict(runs[0])
  medians = [r["median_s"] for r in runs]
  row["median_s"] = float(np.median(medians))
  row["round_medians_s"] = medians
  row["gflops_per_s"] = row["gflop_per_step"] / row["median_s"]
  row["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--rounds", type=int, default=3, help="runs of each case per framework")
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset")
  parser.add_argument(
    "--out", default=os.path.join(HERE, "results", "bench_train.json"), help="with --json"
  )
  parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
  parser.add_argument(
    "--framework", choices=("jax", "torch", "flops"), default="jax", help=argparse.SUPPRESS
  )
  args = parser.parse_args()
  if args.case:  # child process: one case, one JSON line
    if args.framework == "flops":
      print(json.dumps(case_flops(args.case)))
      return
    if args.framework == "jax" and not args.case.endswith("_no_release"):
      from dmad_jax.train import host_memory

      host_memory.use_memory_scheduler()  # as `dmad train` does, before JAX starts
    run = run_case if args.framework == "jax" else run_torch_case
    print(json.dumps(run(args.case, args.repeats)))
    return
  peak = _matmul_peak_gflops()
  names = args.cases.split(",")
  # Rounds are the outer loop, so that every case meets the machine's drift over minutes alike;
  # within a round the frameworks alternate which goes first, and each time reported is the
  # median over rounds of the per-round medians.
  runs = {name: {"jax": [], "torch": []} for name in names}
  for r in range(args.rounds):
    for name in names:
      order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
      for framework in order:
        if framework == "jax" or (args.torch and name in TWIN_CASES):
          runs[name][framework].append(_child(name, args.repeats, framework))
  rows = []
  for name in names:
    gflop = _flops_child(name) / 1e9
    for run in runs[name]["jax"]:
      run["gflop_per_step"] = gflop
    row = _summary(runs[name]["jax"])
    row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak
    if runs[name]["torch"]:
      row["torch_twin"] = _summary(runs[name]["torch"])
      row["speedup_vs_torch_twin"] = row["torch_twin"]["median_s"] / row["median_s"]
    if name in TORCH_REFERENCE_S:
      row["torch_reference_s"] = TORCH_REFERENCE_S[name]
      row["speedup_vs_torch_reference"] = TORCH_REFERENCE_S[name] / row["median_s"]
    rows.append(row)
  result = {
    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
    "matmul_peak_gflops": peak,
    "matmul_peak_gflops_after": _matmul_peak_gflops(),
    "results": rows,
  }
  result["command"] = "python experiments/bench_train.py " + " ".join(sys.argv[1:])
  if args.json:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(json.dumps(result))
    return
  print(
    f"machine: {result['machine']}  float32 matmul peak: {peak:.1f} GFLOP/s before, "
    f"{result['matmul_peak_gflops_after']:.1f} after"
  )
  print(
    f"{'case':20s} {'s/step':>8s} {'compile s':>9s} {'GFLOP':>8s} {'GFLOP/s':>8s} "
    f"{'of peak':>7s} {'RSS GiB':>7s} {'twin s':>7s} {'twin RSS':>8s} {'speedup':>7s}"
  )
  for r in rows:
    twin = r.get("torch_twin", {})
    print(
      f"{r['case']:20s} {r['median_s']:8.3f} {r['compile_s']:9.1f} {r['gflop_per_step']:8.1f} "
      f"{r['gflops_per_s']:8.1f} {r['fraction_of_matmul_peak']:7.2f} {r['peak_rss_gib']:7.2f} "
      f"{twin.get('median_s', float('nan')):7.3f} {twin.get('peak_rss_gib', float('nan')):8.2f} "
      f"{r.get('speedup_vs_torch_twin', float('nan')):7.2f}"
    )


if __name__ == "__main__":
  main()
