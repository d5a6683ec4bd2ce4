"""The config-arg syntax shared by every file in ``configs/``.

``--config configs/<name>.py:<arg>`` passes ``<arg>`` to ``get_config``: ``key=value`` items
separated by ``;`` or ``,``, and bare flags such as ``runlocal`` (the tiny test-sized variant).
A ``,`` only separates items when the text after it starts a known key or flag, so values may
hold commas: ``protocol=normal=1,3,5;runlocal`` and ``root=/d,image_size=32,runlocal`` both parse.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence

import ml_collections

FLAGS = ("runlocal",)


def set_duration(c, name: str, *, steps: int | None = None, epochs: float | None = None) -> None:
  """Sets duration ``name`` ("total", "log_every", "checkpoint_every") of config ``c`` in steps
  or in epochs of the training split, removing the other form (the trainer refuses both)."""
  for unit, value in (("steps", steps), ("epochs", epochs)):
    key = f"{name}_{unit}"
    if value is None:
      if key in c:
        del c[key]
    else:
      c[key] = value


def set_compute(c, compute_dtype: str = "float32", remat: str = "none") -> None:
  """The compute keys every config carries: ``c.compute_dtype``, the dtype convolutions,
  matmuls and activations run in ("float32" or "bfloat16"; parameters, optimizer state,
  statistics, losses and scores stay float32, see ``dmad_jax.nn.precision``), and ``c.remat``,
  what the backward pass recomputes instead of keeping ("none" or "conv_outputs", see
  ``dmad_jax.nn.remat``)."""
  c.compute_dtype = compute_dtype
  c.remat = remat


# Image configs hold this share of the training images out of training (a folder without
# validation/, or the digits' train part) and fit the decision threshold on its normal images:
# the model has fitted its training images, so their scores sit below those of unseen normal
# images and a threshold from them flags far more than 1 - quantile of new normal images.
VALIDATION_FRACTION = 0.2
THRESHOLD_QUANTILE = 0.99
# A lognormal prediction bound rather than the empirical quantile: a folder of 50 images holds 10
# out, and the 0.99 quantile of 10 scores is about their maximum, which about 1 new normal image
# in 11 exceeds (dmad_jax.evaluation.calibration).
THRESHOLD_METHOD = "lognormal"


def set_held_out_threshold(c, fraction: float = VALIDATION_FRACTION) -> None:
  """Holds ``fraction`` of the training images out as the validation split
  (``c.data.validation_fraction``, chosen with ``c.data.seed``) and fits the decision threshold
  there: the ``THRESHOLD_QUANTILE`` prediction bound of a lognormal fitted to its normal images'
  scores (``THRESHOLD_METHOD``; dmad_jax.evaluation.calibration; ``--config.calibration.method=
  normal_quantile`` is their empirical quantile, ``--config.calibration.split=train`` fits on
  the training images)."""
  import ml_collections

  c.data.validation_fraction = float(fraction)
  if "seed" not in c.data:
    c.data.seed = 0  # which images are held out (digits: the split's own seed)
  c.calibration = ml_collections.ConfigDict(
    dict(method=THRESHOLD_METHOD, split="validation", quantile=THRESHOLD_QUANTILE)
  )


def set_test_durations(c) -> None:
  """The test-sized run length: 2 steps, logged and checkpointed at each."""
  set_duration(c, "total", steps=2)
  set_duration(c, "log_every", steps=1)
  set_duration(c, "checkpoint_every", steps=1)


def _items(arg: str, keys: Sequence[str], flags: Sequence[str]) -> list[str]:
  """The items of ``arg``: split on ';', and on ',' where a known key or flag follows."""
  names = "|".join(map(re.escape, [*keys, *flags]))
  starts = re.compile(rf"(?:{names})(?:=|$)")
  out = []
  for group in (arg or "").split(";"):
    pieces = group.split(",")
    merged = [pieces[0]]
    for piece in pieces[1:]:
      if starts.match(piece):
        merged.append(piece)
      else:
        merged[-1] += "," + piece
    out.extend(p for p in merged if p)
  return out


def parse_arg(
  name: str,
  arg: str | None,
  defaults: Mapping[str, object],
  *,
  choices: Mapping[str, Sequence] | None = None,
  required: Sequence[str] = (),
  example: str = "",
  flags: Sequence[str] = FLAGS,
) -> dict:
  """``defaults`` updated from the config arg; values are cast to their default's type.

  Args:
    name: the config's name (``configs/<name>.py``), for messages.
    arg: the text after ``:`` in ``--config`` (None or "" = all defaults).
    defaults: every accepted key with its default; an int or float default casts the value, a
      None or str default keeps it a string.
    choices: allowed values per key.
    required: keys that must be given (non-empty).
    example: a complete arg to show when a required key is missing, e.g. ``"root=/data/x"``.
    flags: bare words accepted without a value; each is False unless given.

  Returns:
    ``{**defaults, flag: bool for each flag}`` with the given values.

  Raises:
    ValueError: naming the config and the item for an unknown key (with the closest known one),
      a value of the wrong type, a value not in ``choices`` or a missing required key (with the
      arg to pass).
  """
  out = {**defaults, **{f: False for f in flags}}
  known = [*defaults, *flags]
  for item in _items(arg or "", list(defaults), flags):
    key, eq, value = item.partition("=")
    if key in flags and not eq:
      out[key] = True
      continue
    if key not in defaults or not eq:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      raise ValueError(
        f"configs/{name}.py: unknown config arg {item!r} ({hint}known: {', '.join(known)})"
      )
    default = defaults[key]
    if isinstance(default, bool):
      cast = lambda v: v.lower() in ("1", "true", "yes")  # noqa: E731
    elif isinstance(default, int | float):
      cast = type(default)
    else:
      cast = str
    try:
      out[key] = cast(value)
    except ValueError:
      raise ValueError(
        f"configs/{name}.py: config arg {key}={value!r} must be a {type(default).__name__}"
      ) from None
  missing = [k for k in required if out.get(k) in (None, "")]
  if missing:
    given = f"configs/{name}.py:{example}" if example else f"configs/{name}.py:{missing[0]}=..."
    raise ValueError(
      f"configs/{name}.py needs the config arg{'s' if len(missing) > 1 else ''} "
      f"{', '.join(k + '=...' for k in missing)}: pass --config {given}"
    )
  for key, allowed in (choices or {}).items():
    if out[key] not in allowed:
      raise ValueError(
        f"configs/{name}.py: {key} must be one of {', '.join(map(str, allowed))}, got {out[key]!r}"
      )
  return out


def video_data(
  *, root: str, labels: str | None, runlocal: bool, gray: bool = False, templates: str = "single"
):
  """``config.data`` of a frame-dump video set as the video models read it: clips of 5 frames
  (4 in, the 5th the target) at 256x256 (32x32 with ``runlocal``), resized with OpenCV's
  bilinear definition as the released MNAD / DMAD-PDM code reads frames ("pil_bilinear" is
  PIL's filter, antialiased when downscaling)."""
  import ml_collections

  return ml_collections.ConfigDict(
    dict(
      name="video",
      root=root,
      image_size=32 if runlocal else 256,
      gray=gray,
      t_length=5,
      labels=labels or "",
      templates=templates,
      resize="cv2_bilinear",
    )
  )


# Every key the eval job reads from ``config.eval`` (dmad_jax.evaluation.job), with its default.
EVAL_DEFAULTS = {
  "batch_size": 64,
  "figure_samples": 6,
  "recipe": "none",
  "aupro_fpr_limit": 0.3,
  "save_pixel_maps": False,
  # The authors' test-informed protocols, reported next to the standard metrics and always
  # named ..._test_selected: scores scaled with test-set ranges (Detector.test_selected_scores),
  # the best of the scores the authors report (Detector.reported_best_of), and the best
  # checkpoint on the test split among those evaluated so far (DMAD-PDM's selection).
  "test_selected": False,
  # Classical detectors on raw pixels (KDE, k-NN, PCA, one-class SVM, isolation forest), fitted
  # on the training split and scored on the test split: reported as baseline_image_AUROC_<name>
  # (dmad_jax.evaluation.baselines). Reads the training split.
  "baselines": False,
  # The split scored: "test", or "validation" (images held out of training, see
  # dmad_jax.data.get_source) to compare settings without looking at the test split; its
  # outputs go to <workdir>/eval_validation/ and it fits no decision threshold.
  "split": "test",
}


def eval_section(**values) -> ml_collections.ConfigDict:
  """``config.eval`` with every key of :data:`EVAL_DEFAULTS`, ``values`` replacing defaults: a
  config whose section lacks a key cannot take it on the command line
  (``--config.eval.test_selected=True``), as ``dmad`` locks the config it loads.

  Raises:
    KeyError: for a key the eval job does not read.
  """
  unknown = sorted(set(values) - set(EVAL_DEFAULTS))
  if unknown:
    raise KeyError(f"eval_section: unknown keys {unknown}; known: {sorted(EVAL_DEFAULTS)}")
  return ml_collections.ConfigDict({**EVAL_DEFAULTS, **values})
