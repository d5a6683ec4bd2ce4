"""Metric writing: clu writers (TensorBoard when TensorFlow is installed) plus a JSONL file.

Every scalar also goes to ``<dir>/metrics.jsonl``, one JSON object per line with its ``step``,
so that runs can be read without TensorBoard. clu's ``metric_writers`` imports TensorFlow at
import time; without it (the default install) scalars still go to the log and the JSONL file,
and a single warning says to install the ``tensorboard`` extra for event files.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger("dmad_jax")


def _clu_writer(logdir: str, just_logging: bool):
  try:
    from clu import metric_writers
  except ImportError as e:  # TensorFlow missing: clu's writers cannot be imported at all
    log.warning(
      "TensorBoard events are off (%s); install dmad_jax[tensorboard] to write them. "
      "Scalars still go to metrics.jsonl and the log.",
      e,
    )
    return None
  return metric_writers.create_default_writer(logdir, just_logging=just_logging)


class MetricWriter:
  """Writes scalars to clu (TensorBoard + log) and appends them to ``metrics.jsonl``.

  Args:
    logdir: directory of the event files and of ``metrics.jsonl``.
    enabled: False on every process but 0, which then writes nothing.
    jsonl_name: file name of the JSONL log inside ``logdir``.
  """

  def __init__(self, logdir: str, *, enabled: bool = True, jsonl_name: str = "metrics.jsonl"):
    self.enabled = enabled
    self.logdir = logdir
    self._clu = None
    self._jsonl = None
    if enabled:
      os.makedirs(logdir, exist_ok=True)
      self._clu = _clu_writer(logdir, just_logging=False)
      self._jsonl = open(os.path.join(logdir, jsonl_name), "a")  # noqa: SIM115

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes a dict of scalars (numbers or 0-d arrays) at ``step``."""
    if not self.enabled:
      return
    plain = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if self._clu is not None:
      self._clu.write_scalars(step, plain)
    else:
      log.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(plain.items())))
    row = {"step": int(step)}
    row.update({k: (v if math.isfinite(v) else str(v)) for k, v in plain.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self.enabled and self._clu is not None:
      self._clu.write_hparams(dict(hparams))

  def flush(self) -> None:
    if self.enabled and self._clu is not None:
      self._clu.flush()

  def close(self) -> None:
    if self.enabled:
      if self._clu is not None:
        self._clu.close()
      self._jsonl.close()
      self.enabled = False
