"""Durations of a run, in epochs of the training split or in steps, converted once.

A config gives each duration either in steps or in epochs: ``total_steps`` or ``total_epochs``,
``log_every_steps`` or ``log_every_epochs``, ``checkpoint_every_steps`` or
``checkpoint_every_epochs``; and, for detectors that fit values to the training split during
training (``Detector.fit_to_data``), ``refit_every_steps`` or ``refit_every_epochs`` (default:
never after the start). Epochs are passes over the training split: with N training records
and a global batch of B, one epoch is N / B steps, so a config written for a 50-image folder
trains it for as many passes as a 5,000-image one. :func:`plan` converts everything to steps
once, from the data source's size, and the trainer writes the result to ``<workdir>/plan.json``
(the eval job's ``--watch`` reads the final step from there).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

# Duration name -> default when the config gives neither form (None: required).
DURATIONS = {
  "total": None,
  "log_every": ("steps", 50),
  "checkpoint_every": ("steps", 1000),
  "refit_every": ("steps", 0),  # 0: never (only before the first step)
}
PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run's durations in steps.

  Attributes:
    train_records: records in the training split.
    batch_size: global batch size.
    total_steps: optimizer steps of the run.
    log_every_steps: steps between logged scalars.
    checkpoint_every_steps: steps between checkpoints (the last step is always saved).
    refit_every_steps: steps between the detector's fits to the training split (0: none after
      the one before the first step).
  """

  train_records: int
  batch_size: int
  total_steps: int
  log_every_steps: int
  checkpoint_every_steps: int
  refit_every_steps: int = 0

  @property
  def epochs(self) -> float:
    """Passes over the training split the run makes."""
    return self.total_steps * self.batch_size / self.train_records

  def describe(self) -> str:
    return (
      f"{self.total_steps} steps of batch {self.batch_size} = {self.epochs:.4g} epochs of "
      f"{self.train_records} training records; log every {self.log_every_steps} steps, "
      f"checkpoint every {self.checkpoint_every_steps}"
      + (f", refit every {self.refit_every_steps}" if self.refit_every_steps else "")
    )


def given(config, name: str) -> tuple[str, float] | None:
  """``("steps" | "epochs", value)`` of duration ``name`` in ``config``, or None.

  Raises:
    ValueError: when both forms are given, or the value is not a positive number (an int for
      steps).
  """
  steps, epochs = config.get(f"{name}_steps", None), config.get(f"{name}_epochs", None)
  if steps is not None and epochs is not None:
    raise ValueError(
      f"config.{name}_steps ({steps}) and config.{name}_epochs ({epochs}) are both set: give one"
    )
  if steps is not None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
      raise ValueError(f"config.{name}_steps must be an int >= 1, got {steps!r}")
    return "steps", steps
  if epochs is not None:
    if isinstance(epochs, bool) or not isinstance(epochs, int | float) or not epochs > 0:
      raise ValueError(f"config.{name}_epochs must be a number > 0, got {epochs!r}")
    return "epochs", float(epochs)
  return None


def check(config) -> list[str]:
  """Problems with the config's durations (empty when none), before any data is read."""
  problems = []
  for name, default in DURATIONS.items():
    try:
      if given(config, name) is None and default is None:
        problems.append(f"config.{name}_steps or config.{name}_epochs is required")
    except ValueError as err:
      problems.append(str(err))
  return problems


def to_steps(config, name: str, train_records: int, batch_size: int) -> int:
  """Duration ``name`` in steps (at least 1)."""
  unit, value = given(config, name) or DURATIONS[name]
  if unit == "steps":
    return int(value)  # 0 only for refit_every's default: never
  return max(1, math.ceil(value * train_records / batch_size))


def plan(config, train_records: int) -> Plan:
  """Every duration of ``config`` in steps, for a training split of ``train_records``."""
  if train_records < 1:
    raise ValueError("the training split has no records")
  bs = int(config.batch_size)
  return Plan(
    train_records=int(train_records),
    batch_size=bs,
    total_steps=to_steps(config, "total", train_records, bs),
    log_every_steps=to_steps(config, "log_every", train_records, bs),
    checkpoint_every_steps=to_steps(config, "checkpoint_every", train_records, bs),
    refit_every_steps=to_steps(config, "refit_every", train_records, bs),
  )


def save(workdir: str, p: Plan) -> None:
  with open(os.path.join(workdir, PLAN_FILE), "w") as f:
    json.dump({**dataclasses.asdict(p), "epochs": p.epochs}, f, indent=2)


def final_step(config, workdir: str) -> int | None:
  """The run's last step: ``config.total_steps``, or the trainer's plan in ``workdir`` for a
  config in epochs (None while no trainer has written it)."""
  unit_value = given(config, "total")
  if unit_value is not None and unit_value[0] == "steps":
    return int(unit_value[1])
  path = os.path.join(workdir, PLAN_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return int(json.load(f)["total_steps"])
