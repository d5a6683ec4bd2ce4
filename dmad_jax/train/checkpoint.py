"""Checkpoints: orbax ``CheckpointManager`` over the train state and the grain iterator position.

One module for both the trainer (save / resume) and the eval job (restore a given or the latest
step). Layout: ``<workdir>/checkpoints/<step>/{state,data}``. Orbax writes each step into a
temporary directory and renames it when complete, so an interrupted save never becomes the
latest step.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA = "data"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, max_to_keep: int | None = 3, read_only: bool = False):
  """The run's CheckpointManager (creates the directory unless read_only)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=not read_only, read_only=read_only
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(STATE, DATA))


def save(mngr, step: int, state, data_iter=None) -> None:
  """Saves the state (and the data iterator position when given) at ``step``."""
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**items))


def restore(mngr, step: int, abstract_state, data_iter=None):
  """Restores ``step`` into the structure of ``abstract_state`` (and ``data_iter`` in place).

  Raises:
    ValueError: when the checkpoint does not fit the model of the config (another model,
      other sizes), naming the checkpoint directory.
  """
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f"checkpoint {os.path.join(str(mngr.directory), str(step))} does not match the model of "
      f"this config (different model or sizes?): {e}"
    ) from e
  return restored[STATE]


def abstract(tree):
  """Shape/dtype structure of a pytree, for restoring without allocating twice."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
