"""Where a DMAD-PDM training step at Ped2 size spends its time on this CPU (issue 3's target).

  python experiments/profile_train_step.py [--batch 4] [--json]

1. Profiles one jitted train step (the bench_train.py case) with ``jax.profiler`` and sums the
   execution time of every XLA op by what it computes, read from the op's source metadata:
   convolution forward, convolution input gradient, convolution weight gradient (the C++
   kernel of dmad_jax.ops.conv on CPU), grid_sample (its C++ kernels), everything else. The
   times are thread-seconds of op execution: ops may run on both cores at once, and time
   between ops (buffer allocation, scheduling) is not counted, so they need not add up to the
   step's wall time.
2. Times the same step with every convolution's weight gradient replaced by zeros, which bounds
   what any faster weight gradient could give.

Writes experiments/results/profile_train_step.json.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "profile_train_step.json")


def _step(batch):
  from dmad_jax import data as data_lib
  from dmad_jax.configs import load
  from dmad_jax.models import get_detector
  from dmad_jax.train import state as state_lib
  from dmad_jax.train.optim import learning_rate_schedule
  from dmad_jax.train.trainer import train_step

  config = load(os.path.join(os.path.dirname(HERE), "configs", "ped2_pdm.py"), "root=unused")
  detector = get_detector(config)
  rng = np.random.default_rng(0)
  data = {"frames": rng.uniform(-1, 1, (batch, 256, 256, 15)).astype(np.float32)}
  state = state_lib.initial(config, detector, data_lib.element_spec(config.data), 1000)
  schedule = learning_rate_schedule(config.optimizer, 1000)
  fn = jax.jit(
    functools.partial(train_step, detector=detector, lr_schedule=schedule), donate_argnums=0
  )
  return fn, state, data


def _median_step_s(fn, state, data, repeats):
  times = []
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    state = fn(state, data)[0]
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return float(np.median(times[1:])), state


def _categories(hlo_text: str, batch: int) -> dict[str, str]:
  """HLO instruction name -> category, from its op_name metadata and output shape."""
  out = {}
  # Array- and tuple-shaped results alike: the first shape after "=" gives the leading dimension.
  pattern = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\[]*\[([\d,]*)\]")
  op_pattern = re.compile(r"op_name=\"([^\"]*)\"")
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if not m:
      continue
    name, dims = m.groups()
    o = op_pattern.search(line)
    op_name = o.group(1) if o else ""
    leading = int(dims.split(",")[0]) if dims else -1
    if "dmad_grid_sample" in line or "grid_sample" in op_name:
      out[name] = "grid_sample"
    elif "dmad_conv_weight_grad" in line:
      out[name] = "conv weight gradient"
    elif "conv_general_dilated" in op_name or "conv_transpose" in op_name:
      if "transpose(jvp" not in op_name:
        out[name] = "conv forward"
      elif leading == batch:
        out[name] = "conv input gradient"
      else:
        out[name] = "conv weight gradient"
    else:
      out[name] = "other"
  return out


def _union_seconds(intervals) -> float:
  """Length of the union of (start, duration) intervals in microseconds, in seconds."""
  total, end = 0.0, -np.inf
  for start, dur in sorted(intervals):
    if start + dur > end:
      total += start + dur - max(start, end)
      end = start + dur
  return total / 1e6


def _thread_summary(events, cats) -> list[dict]:
  """Per trace thread that ran XLA ops: the span from its first to its last event, the time
  covered by any event (busy), by the program's ops (HLO instructions) and by other events
  (runtime work such as buffer allocation), and its longest non-op events."""
  names = {
    (e["pid"], e["tid"]): e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X":
      by_thread[(e["pid"], e["tid"])].append(e)
  rows = []
  for key, evs in by_thread.items():
    ops = [(e["ts"], e["dur"]) for e in evs if e["name"] in cats]
    if not ops:
      continue
    other = collections.Counter()
    for e in evs:
      if e["name"] not in cats:
        other[e["name"]] += e["dur"] / 1e6
    start = min(e["ts"] for e in evs)
    end = max(e["ts"] + e["dur"] for e in evs)
    rows.append(
      {
        "thread": names.get(key, str(key)),
        "span_s": (end - start) / 1e6,
        "busy_s": _union_seconds((e["ts"], e["dur"]) for e in evs),
        "op_s": _union_seconds(ops),
        "other_event_s": _union_seconds((e["ts"], e["dur"]) for e in evs if e["name"] not in cats),
        "top_other_events": [{"name": k, "s": v} for k, v in other.most_common(6)],
      }
    )
  return sorted(rows, key=lambda r: -r["op_s"])


def profile(batch: int) -> dict:
  fn, state, data = _step(batch)
  hlo = fn.lower(state, data).compile().as_text()
  step_s, state = _median_step_s(fn, state, data, 3)
  cats = _categories(hlo, batch)
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    state = fn(state, data)[0]
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    (trace,) = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(trace) as f:
      events = json.load(f)["traceEvents"]
  seconds = collections.Counter()
  ops = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in cats:
      seconds[cats[e["name"]]] += e["dur"] / 1e6
      ops[e["name"]] += e["dur"] / 1e6
  total = sum(seconds.values())
  return {
    "threads": _thread_summary(events, cats),
    "batch": batch,
    "step_s": step_s,
    "op_thread_seconds": dict(seconds.most_common()),
    "op_share": {k: v / total for k, v in seconds.most_common()},
    "top_ops": [
      {"op": k, "category": cats[k], "thread_seconds": v} for k, v in ops.most_common(12)
    ],
  }


def _zero_weight_gradient_conv():
  """lax.conv_general_dilated with an exact input gradient and a zero weight gradient."""
  original = lax.conv_general_dilated

  @functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(2, 11)))
  def conv(x, w, *rest):
    return original(x, w, *rest)

  def fwd(x, w, *rest):
    return original(x, w, *rest), (x, w)

  def bwd(*args):
    rest, (x, w), g = args[:-2], args[-2], args[-1]
    return jax.vjp(lambda x: original(x, w, *rest), x)[1](g)[0], jnp.zeros_like(w)

  conv.defvjp(fwd, bwd)

  def patched(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None):  # fmt: skip
    pad = padding if isinstance(padding, str) else tuple(map(tuple, padding))
    dil = lambda d: None if d is None else tuple(d)  # noqa: E731
    return conv(
      lhs, rhs, tuple(window_strides), pad, dil(lhs_dilation), dil(rhs_dilation),
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type,
    )  # fmt: skip

  return patched


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  result = {"machine": {"cores": os.cpu_count()}, "profile": profile(args.batch)}
  # The same step without weight gradients: dmad_jax's convolutions (ops.conv) fall back to
  # lax.conv_general_dilated, which computes none.
  from dmad_jax.ops import conv

  conv._kernel_case = lambda *args: None
  lax.conv_general_dilated = _zero_weight_gradient_conv()
  fn, state, data = _step(args.batch)
  result["step_s_without_conv_weight_gradients"] = _median_step_s(fn, state, data, 3)[0]
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT, "w") as f:
    json.dump(result, f, indent=2)
  if args.json:
    print(json.dumps(result))
    return
  p = result["profile"]
  print(f"train step, batch {p['batch']}: {p['step_s']:.2f} s")
  for k, v in p["op_thread_seconds"].items():
    print(f"  {k:22s} {v:6.2f} thread-s  {p['op_share'][k]:6.1%}")
  for t in p["threads"][:4]:
    print(
      f"  thread {t['thread']}: span {t['span_s']:.2f} s, busy {t['busy_s']:.2f} s, "
      f"ops {t['op_s']:.2f} s, other events {t['other_event_s']:.2f} s"
    )
  print(f"without any conv weight gradient: {result['step_s_without_conv_weight_gradients']:.2f} s")
  print(f"written: {OUT}")


if __name__ == "__main__":
  main()
