"""The ``dmad`` command line; ``dmad`` alone lists the commands (``python -m dmad_jax`` is the
same):

  dmad train --config configs/<x>.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]
  dmad eval --config configs/<x>.py[:ARG] --workdir DIR [--step N | --watch]
  dmad calibrate --workdir DIR [--config FILE] [--step N]
  dmad predict --workdir DIR IMAGES... --out DIR [--step N]
  dmad export --workdir DIR --out MODEL.dmad [--step N] [--platforms cpu,cuda,tpu]
  dmad predict --exported MODEL.dmad IMAGES... --out DIR
  dmad config --config configs/<x>.py[:ARG] [--config.KEY=VALUE ...]
  dmad video-auc --scores F.npz --labels L.npy --recipe R [--plot P.png]
  dmad extract-frames IN.avi OUT_DIR
  dmad convert-weights IN.pth OUT.npz [--arch=wide_resnet50_2]

``train`` calls ``dmad_jax.train.train_and_evaluate``; ``eval`` runs the separate eval job on
the latest (or ``--step``) checkpoint, or with ``--watch`` on every new checkpoint until the
final one; ``calibrate`` fits and stores a checkpoint's decision threshold
(``dmad_jax.evaluation.calibration``; without --config the run's config.json); ``predict``
writes heatmaps and scores of new images (``dmad_jax.predict``); ``export`` writes a calibrated
checkpoint step as one portable file that ``predict --exported`` runs without the model code
(``dmad_jax.exported``); ``video-auc`` re-scores saved
per-frame errors; ``config`` prints a config as JSON; ``extract-frames`` turns a video file into
the frame-dump layout of the video sources; ``convert-weights`` turns torchvision ResNet weights
into a teacher file.

``--config`` takes a config file path, relative to the working directory or absolute; the
config files import only the installed package, so any working directory works.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

# Every command with its arguments and what it does, in the order `dmad` lists them.
COMMANDS = {
  "train": (
    "--config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]",
    "train a model; rerunning resumes from the workdir's latest checkpoint",
  ),
  "eval": (
    "--config FILE[:ARG] --workdir DIR [--step N | --watch]",
    "evaluate a checkpoint: AUROC metrics, figures (--watch: every new checkpoint)",
  ),
  "calibrate": (
    "--workdir DIR [--config FILE[:ARG]] [--step N]",
    "fit and store a checkpoint's decision threshold",
  ),
  "predict": (
    "--workdir DIR | --exported MODEL.dmad  IMAGES... --out DIR [--step N]",
    "anomaly scores and heatmaps of new images",
  ),
  "export": (
    "--workdir DIR --out MODEL.dmad [--step N] [--platforms cpu,cuda,tpu]",
    "a calibrated checkpoint step as one portable file (jax.export; no model code to load it)",
  ),
  "config": (
    "--config FILE[:ARG] [--config.KEY=VALUE ...]",
    "print the config a command would run with, as JSON",
  ),
  "video-auc": (
    "--scores F.npz --labels L.npy [--recipe R] [--plot P.png]",
    "frame AUROC of saved per-frame errors under a score recipe",
  ),
  "extract-frames": (
    "IN.avi OUT_DIR",
    "every frame of a video file as OUT_DIR/000000.jpg, ... (needs OpenCV)",
  ),
  "convert-weights": (
    "IN.pth|IN.safetensors OUT.npz [--arch=A]",
    "torchvision ResNet weights -> a dmad_jax teacher file",
  ),
}


def usage(command: str | None = None) -> str:
  """The usage line of ``command``, or the list of every command."""
  if command is not None:
    return f"usage: dmad {command} {COMMANDS[command][0]}"
  width = max(map(len, COMMANDS))
  lines = [
    f"  dmad {name:<{width}} {args}\n  {'':<{width + 5}} {help_}"
    for name, (args, help_) in COMMANDS.items()
  ]
  return "usage: dmad COMMAND ...; the commands:\n" + "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:args]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, figures).")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest).")
_WATCH = flags.DEFINE_bool("watch", False, "eval: evaluate every new checkpoint until the last.")
_POLL = flags.DEFINE_float("poll_seconds", 30.0, "eval --watch: seconds between polls.")
_SCORES = flags.DEFINE_string(
  "scores", None, "video-auc: .npz of per-frame errors (one array per name) and video_lengths."
)
_LABELS = flags.DEFINE_string("labels", None, "video-auc: frame labels .npy (1 = anomalous).")
_RECIPE = flags.DEFINE_string("recipe", "none", "video-auc: score recipe (see evaluation.video).")
_SKIP = flags.DEFINE_integer("skip_first", 4, "video-auc: unscored frames at each video start.")
_PLOT = flags.DEFINE_string("plot", None, "video-auc: write per-video score plots to this PNG.")
_OUT = flags.DEFINE_string(
  "out", None, "predict: folder for the heatmaps and predictions.json; export: the file written."
)
_EXPORTED = flags.DEFINE_string("exported", None, "predict: a `dmad export` file to run.")
_PLATFORMS = flags.DEFINE_string(
  "platforms", "cpu", "export: comma-separated platforms (cpu, cuda, rocm, tpu)."
)
_ARCH = flags.DEFINE_string(
  "arch", None, "convert-weights: resnet18|resnet34|resnet50|wide_resnet50_2 (default: inferred)."
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Multi-host: call jax.distributed.initialize() first (cluster auto-detection on TPU, SLURM, "
  "Open MPI, Kubernetes). Implied by --coordinator_address.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "Multi-host: host:port of process 0 (manual setups)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout_seconds",
  100,
  "Multi-host: a process silent for this long is declared lost and JAX stops the others (JAX's "
  "default, 100).",
)
_SHUTDOWN = flags.DEFINE_integer(
  "shutdown_timeout_seconds",
  300,
  "Multi-host: how long a finished process waits for the others at exit (JAX's default, 300).",
)


# The decision threshold's lines of the eval summary (dmad_jax.evaluation.calibration.for_eval).
_THRESHOLD_SUMMARY = (
  "threshold",
  "threshold_split",
  "threshold_num_normal",
  "threshold_nominal_FPR",
  "threshold_FPR",
)


def _setup_logging():
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
  )
  logging.getLogger("dmad_jax").setLevel(logging.INFO)
  # orbax and grain log every file operation at INFO through absl; keep their warnings only.
  logging.getLogger("absl").setLevel(logging.WARNING)


def video_auc() -> None:
  """``dmad video-auc``: frame AUROC of saved per-frame errors under a score recipe."""
  import numpy as np

  from dmad_jax.evaluation import video

  if not _SCORES.value or not _LABELS.value:
    raise app.UsageError(usage("video-auc"))
  with np.load(_SCORES.value) as f:
    if "video_lengths" not in f:
      raise app.UsageError(f"{_SCORES.value}: no 'video_lengths' array")
    lengths = f["video_lengths"].astype(int).tolist()
    errors = {k: f[k] for k in f.files if k != "video_lengths"}
  labels = video.load_frame_labels(_LABELS.value, lengths, skip_first=_SKIP.value)
  scores = video.score_frames(errors, video_lengths=lengths, recipe=_RECIPE.value)
  result = {"recipe": _RECIPE.value, **video.frame_auroc(scores, labels, lengths)}
  if _PLOT.value:
    result["plot"] = video.plot_video_scores(
      _PLOT.value, scores, labels, lengths, title=f"recipe {_RECIPE.value}"
    )
  print(json.dumps(result, indent=2))


def convert_weights(src: str, dst: str, arch: str | None = None) -> None:
  """``dmad convert-weights IN OUT``: torchvision ResNet state dict -> dmad_jax ``.npz``."""
  from dmad_jax import convert

  try:
    summary = convert.convert_file(src, dst, arch)
  except (ValueError, TypeError, ImportError, OSError) as e:
    sys.exit(f"convert-weights: {e}")
  print(json.dumps(summary, indent=2))


def extract_frames(video: str, out_dir: str) -> None:
  """``dmad extract-frames IN OUT_DIR``: a video file as numbered frame images."""
  from dmad_jax.data.video import extract_frames as extract

  try:
    count = extract(video, out_dir)
  except (ImportError, ValueError, FileNotFoundError) as e:
    sys.exit(f"extract-frames: {e}")
  print(f"{count} frames: {os.path.abspath(out_dir)}")


def calibrate() -> None:
  """``dmad calibrate``: fits and stores the decision threshold of a checkpoint step."""
  from dmad_jax import predict
  from dmad_jax.evaluation import calibration

  _setup_logging()
  try:
    config = _CONFIG.value if _CONFIG.value is not None else predict.load_config(_WORKDIR.value)
    record = calibration.calibrate(config, _WORKDIR.value, _STEP.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"calibrate: {e}")
  keys = ("step", "method", "split", "quantile", "num_images", "threshold")
  print(json.dumps({k: record[k] for k in keys}, indent=2))
  print(f"calibration: {calibration.calibration_path(_WORKDIR.value, record['step'])}")


def predict_images(paths: list[str]) -> None:
  """``dmad predict --workdir DIR IMAGES... --out DIR``: heatmaps and scores of new images
  (``--exported FILE`` instead of ``--workdir``: from an exported file, without the model code)."""
  _setup_logging()
  try:
    if _EXPORTED.value is not None:
      from dmad_jax import exported

      exported.predict_command(_EXPORTED.value, paths, _OUT.value)
    else:
      from dmad_jax import predict

      predict.predict_command(_WORKDIR.value, paths, _OUT.value, _STEP.value)
  except (ValueError, FileNotFoundError) as e:  # ImageReadError is a ValueError.
    sys.exit(f"predict: {e}")


def export_model() -> None:
  """``dmad export --workdir DIR --out MODEL.dmad``: a calibrated step as one portable file."""
  from dmad_jax import predict

  _setup_logging()
  platforms = tuple(p.strip() for p in _PLATFORMS.value.split(",") if p.strip())
  try:
    predictor = predict.Predictor.from_workdir(_WORKDIR.value, _STEP.value)
    meta = predictor.export(_OUT.value, platforms)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"export: {e}")
  size = os.path.getsize(_OUT.value)
  print(
    f"exported step {meta['step']} of {predictor.workdir} for {', '.join(platforms)}: "
    f"{os.path.abspath(_OUT.value)} ({size / 1e6:.1f} MB); run it with "
    f"`dmad predict --exported {_OUT.value} IMAGES... --out DIR`"
  )


def main(argv):
  command = argv[1] if len(argv) >= 2 else None
  if command not in COMMANDS:
    what = "no command given" if command is None else f"unknown command {command!r}"
    raise app.UsageError(f"{what}\n{usage()}")
  if command == "predict":
    if len(argv) < 3 or (_WORKDIR.value is None) == (_EXPORTED.value is None) or not _OUT.value:
      raise app.UsageError(usage("predict"))
    predict_images(argv[2:])
    return
  if command == "export":
    if len(argv) != 2 or _WORKDIR.value is None or _OUT.value is None:
      raise app.UsageError(usage("export"))
    export_model()
    return
  positional = 2 if command in ("convert-weights", "extract-frames") else 0  # IN OUT
  if len(argv) != 2 + positional:
    raise app.UsageError(f"unexpected arguments {argv[2:]}\n{usage(command)}")
  if command == "calibrate":
    if _WORKDIR.value is None:
      raise app.UsageError(usage("calibrate"))
    calibrate()
    return
  if command == "convert-weights":
    convert_weights(argv[2], argv[3], _ARCH.value)
    return
  if command == "extract-frames":
    extract_frames(argv[2], argv[3])
    return
  if command == "video-auc":
    video_auc()
    return
  if command == "config":
    if _CONFIG.value is None:
      raise app.UsageError(usage("config"))
    print(_CONFIG.value.to_json_best_effort(indent=2))
    return
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError(f"--config and --workdir are required\n{usage(command)}")
  _setup_logging()
  if _DISTRIBUTED.value or _COORDINATOR.value is not None:
    from dmad_jax.train import distributed

    distributed.initialize(
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      heartbeat_timeout_seconds=_HEARTBEAT.value,
      shutdown_timeout_seconds=_SHUTDOWN.value,
    )
  config, workdir = _CONFIG.value, _WORKDIR.value
  if command == "train":
    from dmad_jax.train import train_and_evaluate
    from dmad_jax.train.trainer import TrainingInterrupted

    try:
      train_and_evaluate(config, workdir)
    except TrainingInterrupted as stop:
      # SIGTERM: the step was saved; 143 = 128 + SIGTERM tells schedulers the run is unfinished.
      print(f"dmad train: {stop}", file=sys.stderr)
      sys.exit(143)
    print(f"checkpoints: {os.path.join(os.path.abspath(workdir), 'checkpoints')}")
    return
  from dmad_jax.evaluation import job

  if _WATCH.value:
    results = job.watch(config, workdir, poll_seconds=_POLL.value)
    result = results[max(results)]
  else:
    result = job.evaluate(config, workdir, _STEP.value)
  summary = {
    k: v
    for k, v in result.items()
    if k.startswith(("image_AUROC", "frame_AUROC", "baseline_image_AUROC"))
    or k in ("step", *_THRESHOLD_SUMMARY)
  }
  print(json.dumps(summary, indent=2))
  baselines = {k[len("baseline_image_AUROC_") :]: v for k, v in summary.items() if "baseline" in k}
  if "image_AUROC" in result and baselines:
    best = max(baselines, key=baselines.get)
    df = result.get("image_AUROC_df")
    line = f"image AUROC {result['image_AUROC']:.4f} against the best classical detector of "
    line += f"this run ({best}) {baselines[best]:.4f}"
    print(line + (f"; deformation alone {df:.4f}" if df is not None else ""))
  if "threshold_FPR" in result:
    nominal = result.get("threshold_nominal_FPR")
    print(
      f"threshold: fitted ({result['threshold_method']}) on {result['threshold_num_normal']} "
      f"normal images of the {result['threshold_split']} split; it flags "
      f"{100 * result['threshold_FPR']:.1f}% of the test split's normal images"
      + (f" (nominal {100 * nominal:.1f}%)" if nominal is not None else "")
    )
  print(f"metrics: {os.path.join(job.output_dir(workdir, result['split']), 'metrics.json')}")
  figures = [result[k] for k in ("panel", "heatmaps", "histogram") if result.get(k)]
  print("figures: " + "\n         ".join(figures))


def run():
  """Console-script entry point (``dmad``)."""
  # absl's --help prints the docstring of the __main__ module, and the console script's wrapper
  # has none (`dmad --help` printed a bare "USAGE: dmad [flags]"): give it the command list.
  main_module = sys.modules.get("__main__")
  if main_module is not None and not (main_module.__doc__ or "").strip():
    main_module.__doc__ = usage()
  # The CPU compiler's memory-minimising scheduler, set before JAX starts (train/host_memory.py).
  from dmad_jax.train import host_memory

  host_memory.use_memory_scheduler()
  app.run(main, argv=sys.argv)


if __name__ == "__main__":
  run()
