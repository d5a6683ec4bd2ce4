"""Wall-clock timing shared by the benchmark scripts."""

import time

import numpy as np


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call (which also
  compiles a jitted function). ``fn`` must block until its work is done."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))
