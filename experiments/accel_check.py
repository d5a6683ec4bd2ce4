"""The accelerator check (``make accel-check``): on a GPU or TPU host, the tests marked ``gpu``
and the training benchmark, with one summary; the output goes to
``experiments/results/accel_check_<platform>.json``.

  python experiments/accel_check.py [--timeout 540]

Refuses to run on a CPU-only host (nothing there would be an accelerator result).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--timeout", type=float, default=540.0, help="seconds for everything")
  args = parser.parse_args(argv)
  env = dict(os.environ, JAX_PLATFORMS="")  # the accelerator, not the suite's CPU default
  probe = subprocess.run(
    [sys.executable, "-c", "import jax; print(jax.default_backend(), jax.device_count(), "
     "jax.devices()[0].device_kind)"],  # fmt: skip
    env=env, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  backend, count, kind = probe.stdout.split(maxsplit=2)
  if backend == "cpu":
    print("accel-check: no GPU or TPU backend here (jax.default_backend() is 'cpu')")
    return 2
  t0 = time.time()
  tests = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
     os.path.join(ROOT, "tests", "accelerator_test.py")],  # fmt: skip
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout,
  )  # fmt: skip
  left = max(60.0, args.timeout - (time.time() - t0))
  bench = subprocess.run(
    [sys.executable, os.path.join(HERE, "bench_train.py"), "--no-torch", "--json", "--rounds", "1"],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=left,
  )  # fmt: skip
  summary = {
    "backend": backend,
    "devices": int(count),
    "device_kind": kind.strip(),
    "tests_returncode": tests.returncode,
    "tests_tail": tests.stdout[-3000:],
    "bench_returncode": bench.returncode,
    "bench_tail": bench.stdout[-4000:],
    "seconds": time.time() - t0,
  }
  out = os.path.join(HERE, "results", f"accel_check_{backend}.json")
  with open(out, "w") as f:
    json.dump(summary, f, indent=2)
  print(tests.stdout[-1500:])
  print(bench.stdout[-1500:])
  print(f"accel-check on {count} x {kind.strip()}: tests rc {tests.returncode}, "
        f"bench rc {bench.returncode}; {os.path.relpath(out, ROOT)}")  # fmt: skip
  return int(tests.returncode != 0 or bench.returncode != 0)


if __name__ == "__main__":
  sys.exit(main())
