"""Start-up checks of a training config, run before any data is read or anything is written.

A typo or an impossible value should fail in the first second with a message naming the key,
the value and what would be accepted, not after the data validation pass or hours into a run.
Checked here: the top-level keys (those of the trainer, of the eval job and of the detector,
with the closest known one on a typo), the loop's integers (batch size, seed), the durations,
``nonfinite``, ``param_dtype`` (float64 needs 64-bit JAX) and the sizes that must agree between
``config.data`` and ``config.model``.

Checked elsewhere, in the same way (:func:`dmad_jax.configs.schema.section`) and as early as the
information exists: the detector's sections (building the detector), ``config.data``
(:func:`dmad_jax.data.get_source`), ``config.optimizer`` (:mod:`dmad_jax.train.optim`),
unreadable files (the sources' validation pass), a batch size not divisible by the device count
(:func:`dmad_jax.train.sharding.check_batch_size`), model-specific sizes (the model's ``setup``,
run by ``jax.eval_shape`` before compiling) and a checkpoint of another model
(:func:`dmad_jax.train.checkpoint.restore`).
"""

from __future__ import annotations

from dmad_jax.configs.schema import ConfigError, check_keys
from dmad_jax.nn import precision, remat
from dmad_jax.train import durations

NONFINITE_MODES = ("stop", "skip")
PARAM_DTYPES = ("float32", "float64")
# The top-level keys the trainer and the eval job read; a detector adds its own.
TRAINER_KEYS = (
  "seed",
  "param_dtype",
  "compute_dtype",
  "remat",
  "model_name",
  "data",
  "optimizer",
  "batch_size",
  *(f"{name}_{unit}" for name in durations.DURATIONS for unit in ("steps", "epochs")),
  "keep_checkpoints",
  "nonfinite",
  "mesh",
  "fsdp_min_size",
  "eval_at_end",
  "eval",
  "calibration",
  "init_from",
)

__all__ = ["ConfigError", "check_config"]


def _int_at_least(config, key: str, low: int, problems: list[str], *, optional=False) -> None:
  value = config.get(key, None)
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    problems.append(f"config.{key} must be an int >= {low}, got {value!r}")


def _x64_enabled() -> bool:
  import jax

  return bool(jax.config.jax_enable_x64)


def check_config(config, detector) -> None:
  """Raises a :class:`ConfigError` listing every problem found in ``config``.

  Args:
    config: a training config (see ``configs/``).
    detector: the detector built from it (its sections are checked when it is built).

  Raises:
    ConfigError: for an unknown top-level key (with the closest known one) or impossible values
      (a batch size < 1, a seed outside ``[0, 2**32)``, both ``total_steps`` and
      ``total_epochs``, ``config.data.image_size`` != ``config.model.image_size``, ...); the
      message names each key and value.
  """
  check_keys(
    "config",
    config.keys(),
    (*TRAINER_KEYS, *detector.config_sections, *detector.config_keys),
  )
  problems: list[str] = []
  _int_at_least(config, "batch_size", 1, problems)
  problems += durations.check(config)
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
  for read in (precision.compute_dtype, remat.policy):  # the rules live with what reads them
    try:
      read(config)
    except ValueError as e:
      problems.append(str(e))
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
