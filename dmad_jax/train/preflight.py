"""Start-up checks of a training config, run before any data is read or anything is written.

A typo or an impossible value should fail in the first second with a message naming the key,
the value and what would be accepted, not after the data validation pass or hours into a run.
Checked here: the loop's integers (batch size, step counts, seed), ``nonfinite``,
``param_dtype`` (float64 needs 64-bit JAX), sizes that
must agree between ``config.data`` and ``config.model``, and unknown keys in the config
sections a detector turns into constructor arguments (``config.model``, ``config.loss``, ...).

Checked elsewhere, as early as the information exists: unknown ``config.data`` keys
(:func:`dmad_jax.data.get_sources`), unreadable files (the sources' validation pass), a batch
size not divisible by the device count (:func:`dmad_jax.train.sharding.check_batch_size`),
model-specific sizes such as PDM's ``image_size`` divisibility (the model's ``setup``, run by
``jax.eval_shape`` before compiling) and a checkpoint of another model
(:func:`dmad_jax.train.checkpoint.restore`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import sys

NONFINITE_MODES = ("stop", "skip")
PARAM_DTYPES = ("float32", "float64")

_UNEXPECTED = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


class ConfigError(ValueError):
  """A config that cannot work: unknown keys or impossible values."""


def _int_at_least(config, key: str, low: int, problems: list[str], *, optional=False) -> None:
  value = config.get(key, None)
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    problems.append(f"config.{key} must be an int >= {low}, got {value!r}")


def _known_fields(class_name: str) -> list[str] | None:
  """Constructor fields of the dataclass (Flax module, weights record) called ``class_name`` in
  an imported ``dmad_jax.models`` module; None when there is none."""
  for name, module in list(sys.modules.items()):
    if not name.startswith("dmad_jax.models"):
      continue
    cls = getattr(module, class_name, None)
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
      return sorted(
        f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")
      )
  return None


def _sections_with(config, key: str) -> list[str]:
  return [
    name
    for name, value in config.items()
    if hasattr(value, "keys") and not isinstance(value, str) and key in value.keys()
  ]


def _check_detector(config) -> None:
  """Builds the detector once (no arrays) and turns a constructor TypeError into a message."""
  from dmad_jax.models import get_detector

  # The trainer builds the detector again right after: its warnings (e.g. "random teacher
  # weights") are left to that second build so that they appear once.
  package_log = logging.getLogger("dmad_jax")
  level = package_log.level
  package_log.setLevel(logging.ERROR)
  try:
    get_detector(config)
  except TypeError as err:
    match = _UNEXPECTED.search(str(err))
    if not match:
      raise ConfigError(f"config does not fit model_name {config.model_name!r}: {err}") from err
    class_name, key = match.groups()
    sections = _sections_with(config, key)
    where = " / ".join(f"config.{s}" for s in sections) or "the config"
    known = _known_fields(class_name)
    msg = f"{where} has an unknown key {key!r} for model {config.model_name!r}"
    if known:
      close = difflib.get_close_matches(key, known, n=1)
      if close:
        msg += f" (did you mean {close[0]!r}?)"
      msg += f"; {class_name} accepts: {', '.join(known)}"
    raise ConfigError(msg) from err
  finally:
    package_log.setLevel(level)


def _x64_enabled() -> bool:
  import jax

  return bool(jax.config.jax_enable_x64)


def check_config(config) -> None:
  """Raises a :class:`ConfigError` listing every problem found in ``config``.

  Args:
    config: a training config (see ``configs/``).

  Raises:
    ConfigError: for impossible values (a batch size < 1, a seed outside ``[0, 2**32)``,
      ``config.data.image_size`` != ``config.model.image_size``, ...) or unknown keys in the
      model's config sections; the message names each key and value.
  """
  problems: list[str] = []
  for key in ("batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps"):
    _int_at_least(config, key, 1, problems)
  _int_at_least(config, "keep_checkpoints", 1, problems, optional=True)
  seed = config.get("seed", None)
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
    problems.append(f"config.seed must be an int in [0, 2**32), got {seed!r}")
  mode = config.get("nonfinite", "stop")
  if mode not in NONFINITE_MODES:
    problems.append(f"config.nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
  dtype = config.get("param_dtype", "float32")
  if dtype not in PARAM_DTYPES:
    problems.append(f"config.param_dtype must be one of {PARAM_DTYPES}, got {dtype!r}")
  elif dtype == "float64" and not _x64_enabled():
    problems.append(
      "config.param_dtype 'float64' needs 64-bit JAX: run with JAX_ENABLE_X64=1 in the environment"
    )
  data, model = config.get("data", None), config.get("model", None)
  if data is None:
    problems.append("config.data is missing")
  elif model is not None:
    d_size, m_size = data.get("image_size", None), model.get("image_size", None)
    if d_size is not None and m_size is not None and d_size != m_size:
      problems.append(
        f"config.data.image_size ({d_size}) and config.model.image_size ({m_size}) differ: the "
        "model is built for the size the data is resized to"
      )
    if d_size is not None and (
      isinstance(d_size, bool) or not isinstance(d_size, int) or d_size < 1
    ):
      problems.append(f"config.data.image_size must be a positive int, got {d_size!r}")
    d_ch, m_ch = data.get("channels", None), model.get("out_channels", None)
    if config.get("t_length", 1) == 1 and None not in (d_ch, m_ch) and d_ch != m_ch:
      # Image mode reconstructs its input: a mismatch would silently broadcast in the loss.
      problems.append(
        f"config.data.channels ({d_ch}) and config.model.out_channels ({m_ch}) differ: the "
        "model reconstructs its input image"
      )
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))
  _check_detector(config)
