"""How far 8-device data-parallel training drifts from one device, and why (issue 4).

Trains the runlocal digits PDM for 5 steps at global batch 16 on 8 fake CPU devices and on one,
compares losses and parameters step by step, then compares the gradients of one batch computed
both ways and lists the entries where Adam's normalised update g / (|g| + eps) differs most.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/data_parallel_drift.py

Writes experiments/results/data_parallel_drift.json. With ``--param_dtype float64`` (and
JAX_ENABLE_X64=1 in the environment) the same runs compute in float64, which shows whether the
float32 drift is rounding or a difference in the computation: writes
experiments/results/data_parallel_drift_float64.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from dmad_jax.configs import load
from dmad_jax.train import sharding, trainer
from dmad_jax.train import state as state_lib

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def config(devices: int, param_dtype: str):
  c = load(os.path.join(os.path.dirname(HERE), "configs", "digits_pdm.py"), "runlocal")
  c.batch_size, c.total_steps, c.keep_checkpoints = 16, 5, 10
  c.mesh = [("data", devices)]
  c.param_dtype = param_dtype
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--param_dtype", default="float32", choices=("float32", "float64"))
  args = parser.parse_args()
  if jax.device_count() < 8:
    raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  suffix = "" if args.param_dtype == "float32" else "_" + args.param_dtype
  out = os.path.join(RESULTS, f"data_parallel_drift{suffix}.json")
  root = tempfile.mkdtemp()
  c = config(1, args.param_dtype)
  detector = trainer.get_detector(c)
  source = trainer.data_lib.get_source(c.data, "train")
  runs = {}
  for n in (8, 1):
    work = os.path.join(root, str(n))
    trainer.train_and_evaluate(config(n, args.param_dtype), work)
    with open(os.path.join(work, "metrics.jsonl")) as f:
      losses = [json.loads(line)["loss"] for line in f]
    params = [state_lib.variables_at(c, work, s)["params"] for s in range(1, 6)]
    runs[n] = (losses, params)
  loss_rel = [abs(a - b) / abs(b) for a, b in zip(runs[8][0], runs[1][0], strict=True)]
  param_abs = [
    max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(*map(jax.tree.leaves, (p8, p1)), strict=True)
    )
    for p8, p1 in zip(runs[8][1], runs[1][1], strict=True)
  ]

  # Gradients of one batch at the step-1 parameters, on 8 devices and on one.
  state = state_lib.state_at(c, os.path.join(root, "1"), 1)
  records = [source[i] for i in range(16)]
  batch = {k: np.stack([r[k] for r in records]) for k in records[0]}

  def grads(params, batch):
    loss = lambda p: detector.loss(p, state.batch_stats, batch, jax.random.PRNGKey(0))[0]  # noqa: E731
    return jax.grad(loss)(params)

  g = {}
  for n in (8, 1):
    mesh = sharding.make_mesh([("data", n)])
    rep, dsh = sharding.replicated(mesh), sharding.data_sharding(mesh)
    fn = jax.jit(grads, in_shardings=(rep, dsh), out_shardings=rep)
    g[n] = jax.device_get(fn(jax.device_put(state.params, rep), jax.device_put(batch, dsh)))
  eps = float(c.optimizer.eps)
  rows = []
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(g[8])[0], jax.tree.leaves(g[1]), strict=True
  ):
    a, b = np.asarray(a), np.asarray(b)
    da = np.abs(a / (np.abs(a) + eps) - b / (np.abs(b) + eps))
    k = int(np.argmax(da))
    rows.append(
      dict(
        param=jax.tree_util.keystr(path),
        max_update_direction_diff=float(da.flat[k]),
        grad_8_devices=float(a.flat[k]),
        grad_1_device=float(b.flat[k]),
        leaf_max_abs_grad=float(np.abs(b).max()),
      )
    )
  rows.sort(key=lambda r: -r["max_update_direction_diff"])
  result = dict(
    machine="2-core CPU, 8 fake XLA host devices",
    param_dtype=args.param_dtype,
    loss_relative_difference_per_step=loss_rel,
    param_max_abs_difference_per_step=param_abs,
    adam_eps=eps,
    worst_gradient_entries=rows[:8],
  )
  os.makedirs(RESULTS, exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))
  shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
