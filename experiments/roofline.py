"""FLOPs and bytes of every model's train and predict steps, and step times projected for
accelerators from their published peaks (a projection, not a measurement).

  python experiments/roofline.py [--json]        # paper configurations (stored table)
  python experiments/roofline.py --smallest      # the runlocal configs (what `make test` runs)

For each model at its paper configuration and batch size:

* FLOPs and bytes accessed of one train step (forward, backward, optimizer update) and of one
  predict step, from XLA's HLO cost analysis of the lowered program (``Lowered.cost_analysis``;
  the unoptimised module, so "bytes" counts every operand and result before fusion: an upper
  bound of the memory traffic). The programs are traced as for an accelerator
  (``cpu_kernels.lowering_for(("cuda",))``), so the CPU kernels, which the cost analysis cannot
  see into, are replaced by the plain XLA formulations every accelerator runs;
* the gradient bytes data parallelism all-reduces per step (every trained parameter, float32);
* per chip (:data:`CHIPS`): the projected step time as a range, from ``t_lo = F / P`` (every
  FLOP at peak ``P``) to ``t_hi = max(F / P, B / M)`` (roofline with memory bandwidth ``M`` and
  the pre-fusion bytes, which overstate the traffic of a fused program several times); the ring
  all-reduce time of the gradients over ``n`` chips ``t_ar = 2 (n - 1) / n * G / L`` (``L``:
  per-chip interconnect bandwidth in one direction); and the weak-scaling efficiency
  ``t_lo / (t_lo + t_ar)`` at n = 8 (the fastest step and no overlap of communication with
  compute: the least favourable case for scaling under this model).

Precision: each program is costed twice, computing in float32 and with
``config.compute_dtype = "bfloat16"`` (convolutions, matmuls and activations in bfloat16;
parameters, optimizer state, statistics, losses and scores in float32: ``dmad_jax.nn.precision``).
The FLOPs do not change; the pre-fusion bytes shrink less than the activations' halving
suggests, since they count every operand of every operation, casts included. ``P`` is the same
for both: the rate JAX's default
precision runs float32 matrix products at is TF32 tensor cores on A100 and H100 and single-pass
bfloat16 MXU passes on TPU, i.e. their published bf16 peak, so what bfloat16 compute buys in this
model is the memory-bound upper end ``B / M`` (and the memory held). The gradients stay float32,
so the all-reduce is the same. Projections assume peak rates and ignore kernel launch and
input-pipeline costs, so real steps are slower.

Writes ``experiments/results/roofline.json`` (with ``--json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import tempfile

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Published per-chip figures (vendor spec sheets): peak FLOP/s at JAX's default float32
# precision, HBM bandwidth, and interconnect bandwidth per chip in one direction.
CHIPS = {
  # Cloud TPU v5e: 197 TFLOP/s bf16, 819 GB/s HBM2, 400 GB/s bidirectional ICI per chip.
  "TPU v5e": {"flops": 197e12, "hbm": 819e9, "link": 200e9},
  # Cloud TPU v4: 275 TFLOP/s bf16, 1200 GB/s HBM2; all-reduce bandwidth 1.1 PB/s per
  # 4096-chip pod, i.e. 268 GB/s per chip.
  "TPU v4": {"flops": 275e12, "hbm": 1200e9, "link": 1.1e15 / 4096},
  # NVIDIA H100 SXM: 494.5 TFLOP/s TF32 (dense), 3.35 TB/s HBM3, NVLink 900 GB/s bidirectional.
  "H100": {"flops": 494.5e12, "hbm": 3.35e12, "link": 450e9},
  # NVIDIA A100 SXM 80 GB: 156 TFLOP/s TF32 (dense), 2.039 TB/s HBM2e, NVLink 600 GB/s.
  "A100": {"flops": 156e12, "hbm": 2.039e12, "link": 300e9},
}
SCALE_TO = 8
DTYPES = ("float32", "bfloat16")

# Model name -> (config file, arg at the paper configuration, arg of the smallest config).
# "{frames}" is a frame-dump skeleton this script makes (ShanghaiTech counts its scenes).
MODELS = {
  "pdm_ped2": ("ped2_pdm.py", "root=/d", "root=/d;runlocal"),
  "pdm_avenue": ("avenue_pdm.py", "root=/d", "root=/d;runlocal"),
  "pdm_shanghai": ("shanghai_pdm.py", "root={frames}", "root={frames};runlocal"),
  "ppdm": ("mvtec_ppdm.py", "root=/d;category=bottle", "root=/d;category=bottle;runlocal"),
  "rd": ("mvtec_rd.py", "root=/d;category=bottle", "root=/d;category=bottle;runlocal"),
  "daad": (
    "mvtec_daad.py",
    "root=/d;category=bottle;variant=daad",
    "root=/d;category=bottle;variant=daad;runlocal",
  ),
  "daad_plus": ("mvtec_daad.py", "root=/d;category=bottle", "root=/d;category=bottle;runlocal"),
  "daad_video": ("ped2_daad.py", "root=/d", "root=/d;runlocal"),
  "igd": ("mvtec_igd.py", "root=/d;category=bottle", "root=/d;category=bottle;runlocal"),
  "igd_kd": ("mvtec_igd_kd.py", "root=/d;category=bottle", "root=/d;category=bottle;runlocal"),
  "ard": ("dagm_ard.py", "root=/d;class=1", "root=/d;class=1;runlocal"),
  "mnad_ped2": ("ped2_mnad.py", "root=/d", "root=/d;runlocal"),
}


def _frame_dump(root: str) -> str:
  """A frame-dump skeleton with ShanghaiTech's 13 scenes (no frame is read)."""
  for scene in range(1, 14):
    os.makedirs(os.path.join(root, "training", "frames", f"{scene:02d}_001"), exist_ok=True)
  os.makedirs(os.path.join(root, "testing", "frames", "01_0014"), exist_ok=True)
  return root


def _config(name: str, smallest: bool, frames: str):
  from dmad_jax import configs

  file, paper, small = MODELS[name]
  c = configs.load(
    os.path.join(ROOT, "configs", file), (small if smallest else paper).format(frames=frames)
  )
  with c.unlocked():
    for key in ("random_teacher", "random_backbone"):  # no weight file is read: shapes only
      if key in c.model:
        c.model.backbone_weights = ""
        c.model[key] = True
  return c


def _cost(lowered) -> tuple[float, float]:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def measure(name: str, smallest: bool, frames: str) -> dict:
  """FLOPs, bytes and gradient bytes of one model's train and predict steps."""
  from dmad_jax import data as data_lib
  from dmad_jax.models import get_detector
  from dmad_jax.ops import cpu_kernels
  from dmad_jax.train import state as state_lib
  from dmad_jax.train.optim import learning_rate_schedule
  from dmad_jax.train.trainer import train_step

  costs = {}
  for dtype in DTYPES:
    config = _config(name, smallest, frames)
    config.compute_dtype = dtype
    detector = get_detector(config)
    spec = data_lib.element_spec(config.data)
    shapes = state_lib.abstract_variables(config, detector, spec)
    tx = state_lib.optimizer(config, detector, spec, 100, shapes["params"])
    state = state_lib.abstract(config, detector, spec, tx, variables=shapes)
    batch_size = int(config.batch_size)
    batch = {k: jax.ShapeDtypeStruct((batch_size, *s.shape), s.dtype) for k, s in spec.items()}
    step = jax.jit(
      functools.partial(
        train_step, detector=detector, lr_schedule=learning_rate_schedule(config.optimizer, 100)
      )
    )
    with cpu_kernels.lowering_for(("cuda",)):
      train_flops, train_bytes = _cost(step.lower(state, batch))
      predict_flops, predict_bytes = _cost(jax.jit(detector.predict).lower(shapes, batch))
    costs[dtype] = {
      "train_flops": train_flops,
      "train_bytes": train_bytes,
      "predict_flops": predict_flops,
      "predict_bytes": predict_bytes,
    }
  params = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"]))
  return {
    "model": name,
    "config": f"configs/{MODELS[name][0]}",
    "model_name": config.model_name,
    "batch_size": batch_size,
    "image_size": int(config.data.image_size),
    "parameters": int(params),
    **costs["float32"],
    "bfloat16": costs["bfloat16"],
    "gradient_bytes": 4 * int(params),  # float32 gradients in either compute dtype
  }


def project(row: dict, chip: dict, n: int = SCALE_TO) -> dict:
  """The projected times (seconds) and the weak-scaling efficiency of ``row`` on ``chip``."""
  train_lo = row["train_flops"] / chip["flops"]
  predict_lo = row["predict_flops"] / chip["flops"]
  allreduce = 2 * (n - 1) / n * row["gradient_bytes"] / chip["link"]
  return {
    "train_step_s_lo": train_lo,
    "train_step_s_hi": max(train_lo, row["train_bytes"] / chip["hbm"]),
    "predict_step_s_lo": predict_lo,
    "predict_step_s_hi": max(predict_lo, row["predict_bytes"] / chip["hbm"]),
    "allreduce_s": allreduce,
    "efficiency": train_lo / (train_lo + allreduce),
  }


def table(rows: list[dict]) -> str:
  lines = [
    "| model | batch | params | train GFLOP | train GB f32 / bf16 | predict GFLOP | grad MB | "
    + " | ".join(f"{c} train ms f32 / bf16 (eff. x{SCALE_TO})" for c in CHIPS)
    + " |",
    "|---" * (7 + len(CHIPS)) + "|",
  ]
  for r in rows:
    cells = [
      r["model"],
      str(r["batch_size"]),
      f"{r['parameters'] / 1e6:.2f}M",
      f"{r['train_flops'] / 1e9:.1f}",
      f"{r['train_bytes'] / 1e9:.2f} / {r['bfloat16']['train_bytes'] / 1e9:.2f}",
      f"{r['predict_flops'] / 1e9:.1f}",
      f"{r['gradient_bytes'] / 1e6:.1f}",
    ]
    for chip in CHIPS:
      p, p16 = r["projection"][chip], r["bfloat16"]["projection"][chip]
      lo, hi = p["train_step_s_lo"] * 1e3, p["train_step_s_hi"] * 1e3
      lo16, hi16 = p16["train_step_s_lo"] * 1e3, p16["train_step_s_hi"] * 1e3
      cells.append(f"{lo:.1f}-{hi:.0f} / {lo16:.1f}-{hi16:.0f} ({p['efficiency']:.0%})")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smallest", action="store_true", help="the runlocal configs")
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
  parser.add_argument("--json", action="store_true", help="write experiments/results/roofline.json")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "roofline.json"))
  args = parser.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    frames = _frame_dump(os.path.join(tmp, "frames"))
    for name in args.models.split(","):
      row = measure(name, args.smallest, frames)
      row["projection"] = {chip: project(row, spec) for chip, spec in CHIPS.items()}
      bf16 = {**row["bfloat16"], "gradient_bytes": row["gradient_bytes"]}
      row["bfloat16"]["projection"] = {chip: project(bf16, spec) for chip, spec in CHIPS.items()}
      rows.append(row)
      gflop, gb = row["train_flops"] / 1e9, row["train_bytes"] / 1e9
      print(f"{name}: train step {gflop:.2f} GFLOP, {gb:.3f} GB", file=sys.stderr)
  result = {
    "what": "projection from XLA's HLO cost analysis and published chip peaks (not measured)",
    "configs": "smallest (runlocal)" if args.smallest else "paper",
    "chips": CHIPS,
    "scale_to": SCALE_TO,
    "measured_on": f"{platform.machine()} {platform.processor() or ''} CPU, jax {jax.__version__}",
    "rows": rows,
  }
  print(table(rows))
  if args.json:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"written: {os.path.relpath(args.out, ROOT)}")
  return result


if __name__ == "__main__":
  main()
