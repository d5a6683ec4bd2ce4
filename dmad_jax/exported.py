"""A trained detector as one portable file: ``dmad export`` writes it, :func:`load` runs it.

  dmad export  --workdir runs/demo --out demo.dmad [--step N] [--platforms cpu,cuda,tpu]
  dmad predict --exported demo.dmad IMAGES... --out DIR

The file is a zip archive of

* ``program.jax_export``: ``jax.export``'s serialization of one program, uint8 pixels
  ``(batch, S, S, C)`` -> ``{"scores": {name: (batch,)}, "maps": {name: (batch, S, S)}}``: the
  preprocessing to [-1, 1] and the detector's ``predict`` with the trained variables as
  constants, for the platforms it was exported for, with a symbolic batch size;
* ``meta.json``: the format, the preprocessing of the training data source (size, channels,
  resize), the stored calibration (threshold and normalisation), the pixel map's name, the
  platforms, and the config and checkpoint step it came from.

Loading needs JAX, NumPy and PIL only: not Flax, not the model code (the program is plain
StableHLO; it holds no dmad_jax CPU kernel). :class:`ExportedPredictor` gives the same results as
:class:`dmad_jax.predict.Predictor` on the step it was exported from (same preprocessing,
scores to float32 rounding, same decisions).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from dmad_jax.predictions import ImagePredictor

FORMAT = "dmad-exported-predictor/1"
PROGRAM = "program.jax_export"
META = "meta.json"


def metadata(
  *,
  config: Mapping,
  step: int,
  workdir: str,
  preprocessing: Mapping,
  calibration: Mapping | None,
  pixel_key: str,
  platforms: Sequence[str],
) -> dict:
  """The ``meta.json`` record of an exported predictor."""
  return {
    "format": FORMAT,
    "platforms": list(platforms),
    "preprocessing": dict(preprocessing),
    "calibration": None if calibration is None else dict(calibration),
    "pixel_map": pixel_key,
    "model_name": config.get("model_name"),
    "step": int(step),
    "workdir": workdir,
    "config": dict(config),
  }


def write(path: str, meta: Mapping, program: bytes | bytearray) -> None:
  """Writes the archive (to a temporary name first, so a crash leaves no partial file)."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
    z.writestr(META, json.dumps(meta, indent=2))
    z.writestr(PROGRAM, bytes(program))
  os.replace(tmp, path)


def read(path: str) -> tuple[dict, jax.export.Exported]:
  """``(meta, exported program)`` of an archive.

  Raises:
    ValueError: naming the file, when it is not a dmad export (or of another format version).
  """
  path = os.fspath(path)
  try:
    with zipfile.ZipFile(path) as z:
      meta = json.loads(z.read(META))
      program = z.read(PROGRAM)
  except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as err:
    raise ValueError(f"{path}: not a dmad export ({type(err).__name__}: {err})") from err
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, this dmad_jax reads {FORMAT!r}")
  return meta, jax.export.deserialize(bytearray(program))


class ExportedPredictor(ImagePredictor):
  """An exported detector (see the module docstring); call it on images or files.

  Attributes:
    meta: the file's ``meta.json``.
    preprocessing, calibration, pixel_key, step: as :class:`dmad_jax.predict.Predictor`'s.
    path: the file.
  """

  def __init__(self, path: str):
    """Reads ``path``.

    Raises:
      ValueError: not a dmad export, or not exported for this process's platform.
    """
    self.path = os.path.abspath(os.fspath(path))
    self.meta, self._program = read(self.path)
    platform = jax.default_backend()
    if platform not in self._program.platforms:
      raise ValueError(
        f"{self.path} was exported for {list(self._program.platforms)}, and this process runs on "
        f"{platform!r}: export it with --platforms including {platform}"
      )
    self.preprocessing = dict(self.meta["preprocessing"])
    cal = self.meta["calibration"]
    self.calibration = None if cal is None else dict(cal)
    self.pixel_key = self.meta["pixel_map"]
    self.step = int(self.meta["step"])

  def source(self) -> dict:
    return {"exported": self.path, "workdir": self.meta["workdir"]}

  def predict_inputs(self, inputs: np.ndarray) -> dict:
    """Scores and maps of model inputs ``(N, S, S, C)`` in [-1, 1] (8-bit values, as every
    :meth:`prepare` / :meth:`load` result is): the program runs on their uint8 pixels."""
    inputs = np.asarray(inputs, np.float32)
    size, ch = self.preprocessing["image_size"], self.preprocessing["channels"]
    if inputs.ndim != 4 or inputs.shape[1:] != (size, size, ch):
      raise ValueError(f"inputs must be (N, {size}, {size}, {ch}), got {inputs.shape}")
    pixels = np.clip(np.rint((inputs + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return jax.tree.map(np.asarray, self._program.call(pixels))


def load(path: str) -> ExportedPredictor:
  """The predictor of an exported file (see :class:`ExportedPredictor`)."""
  return ExportedPredictor(path)


def predict_command(path: str, paths: Sequence[str], out_dir: str) -> dict:
  """``dmad predict --exported FILE``: as ``dmad predict --workdir``, from the exported file."""
  from dmad_jax import predictions

  paths = predictions.expand_paths(paths)
  predictor = load(path)
  if predictor.calibration is None:
    raise ValueError(f"{path} holds no calibration: export a calibrated checkpoint step")
  record = predictions.write_predictions(predictor, predictor.predict_files(paths), out_dir)
  predictions.print_summary(record, out_dir)
  return record
