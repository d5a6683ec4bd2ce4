"""Metric writing: TensorBoard event files plus a JSONL file, without TensorFlow.

Every scalar goes to ``<dir>/metrics.jsonl`` (one JSON object per line with its ``step``, so runs
can be read without TensorBoard) and, when the ``tensorboard`` package is installed (the
``dmad_jax[tensorboard]`` extra), to an ``events.out.tfevents.*`` file in the same directory.

The event file is written with the ``tensorboard`` package's own record framing and protos
(``RecordWriter``, ``event_pb2``, ``summary_pb2``, the hparams plugin's ``hparams_pb``) into a
plain Python file. clu's writers, and tensorboard's ``EventFileWriter``, go through TensorFlow
(``tf.summary`` and ``tf.io.gfile``): importing TensorFlow costs ~5 s of CPU in every ``dmad``
process (measured on this project's 2-core machine: 7.6 s for ``import tensorflow`` against 2.7 s
for JAX, orbax and grain together), which is more than a short eval job spends on its work.
Each record is flushed when written, so a crash loses nothing that was reported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger("dmad_jax")


class EventFile:
  """One TensorBoard event file (``events.out.tfevents.<time>.<host>.<pid>``) in ``logdir``.

  Raises:
    ImportError: when the ``tensorboard`` package is not installed.
  """

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer import record_writer

    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._records = record_writer.RecordWriter(open(self.path, "wb"))  # noqa: SIM115
    self._write(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def write_summary(self, step: int, summary) -> None:
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [
      self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in sorted(scalars.items())
    ]
    self.write_summary(step, self._summary_pb2.Summary(value=values))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboard.plugins.hparams import summary_v2

    self.write_summary(0, summary_v2.hparams_pb(dict(hparams)))

  def close(self) -> None:
    if not self._records.closed:
      self._records.close()


def _event_file(logdir: str) -> EventFile | None:
  try:
    return EventFile(logdir)
  except ImportError as e:
    log.warning(
      "TensorBoard events are off (%s); install dmad_jax[tensorboard] to write them. "
      "Scalars still go to metrics.jsonl and the log.",
      e,
    )
    return None


class MetricWriter:
  """Writes scalars to the log, ``metrics.jsonl`` and a TensorBoard event file.

  Args:
    logdir: directory of the event file and of ``metrics.jsonl``.
    enabled: False on every process but 0, which then writes nothing.
    jsonl_name: file name of the JSONL log inside ``logdir``.
  """

  def __init__(self, logdir: str, *, enabled: bool = True, jsonl_name: str = "metrics.jsonl"):
    self.enabled = enabled
    self.logdir = logdir
    self._events = None
    self._jsonl = None
    if enabled:
      os.makedirs(logdir, exist_ok=True)
      self._events = _event_file(logdir)
      self._jsonl = open(os.path.join(logdir, jsonl_name), "a")  # noqa: SIM115

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes a dict of scalars (numbers or 0-d arrays) at ``step``."""
    if not self.enabled:
      return
    plain = {k: float(np.asarray(v)) for k, v in scalars.items()}
    log.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(plain.items())))
    if self._events is not None:
      self._events.write_scalars(step, plain)
    row = {"step": int(step)}
    row.update({k: (v if math.isfinite(v) else str(v)) for k, v in plain.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self.enabled and self._events is not None:
      self._events.write_hparams(hparams)

  def close(self) -> None:
    if self.enabled:
      if self._events is not None:
        self._events.close()
      self._jsonl.close()
      self.enabled = False
