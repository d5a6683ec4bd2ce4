"""Command line: ``dmad train|eval --config configs/<x>.py[:args] --workdir DIR [--config.k=v]``.

``python -m dmad_jax`` is the same. ``train`` calls ``dmad_jax.train.train_and_evaluate``;
``eval`` runs the separate eval job on the latest (or ``--step``) checkpoint, or with
``--watch`` on every new checkpoint until the final one.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "eval")

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:args]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, figures).")
_STEP = flags.DEFINE_integer("step", None, "eval: checkpoint step (default: latest).")
_WATCH = flags.DEFINE_bool("watch", False, "eval: evaluate every new checkpoint until the last.")
_POLL = flags.DEFINE_float("poll_seconds", 30.0, "eval --watch: seconds between polls.")


def _setup_logging():
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
  )
  logging.getLogger("dmad_jax").setLevel(logging.INFO)
  # orbax and grain log every file operation at INFO through absl; keep their warnings only.
  logging.getLogger("absl").setLevel(logging.WARNING)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: dmad {{{'|'.join(COMMANDS)}}} --config FILE --workdir DIR")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  # TensorFlow (optional: TensorBoard events, TFDS) must not grab GPU memory from JAX.
  try:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass
  _setup_logging()
  config, workdir = _CONFIG.value, _WORKDIR.value
  if argv[1] == "train":
    from dmad_jax.train import train_and_evaluate

    train_and_evaluate(config, workdir)
    print(f"checkpoints: {os.path.join(os.path.abspath(workdir), 'checkpoints')}")
    return
  from dmad_jax.evaluation import job

  if _WATCH.value:
    results = job.watch(config, workdir, poll_seconds=_POLL.value)
    result = results[max(results)]
  else:
    result = job.evaluate(config, workdir, _STEP.value)
  summary = {k: v for k, v in result.items() if k.startswith("image_AUROC") or k == "step"}
  print(json.dumps(summary, indent=2))
  print(f"metrics: {os.path.join(os.path.abspath(workdir), 'eval', 'metrics.json')}")
  print(f"figures: {result.get('panel')}\n         {result.get('histogram')}")


def run():
  """Console-script entry point (``dmad``)."""
  app.run(main, argv=sys.argv)


if __name__ == "__main__":
  run()
