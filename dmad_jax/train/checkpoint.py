"""Checkpoints: orbax ``CheckpointManager`` over the train state and the grain iterator position.

One module for both the trainer (save / resume) and the eval job (restore a given or the latest
step). Layout: ``<workdir>/checkpoints/<step>/{state,data}``; the state (parameters, BatchNorm
statistics, optimizer state, step and the run's PRNG key) and the data iterator position of one
step always sit in the same step directory.

Atomicity: orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` only once every file is written (on file systems without atomic rename, such as GCS,
it writes a ``commit_success.txt`` marker last instead). A process killed mid-save (SIGKILL,
power loss, preemption) therefore leaves at most a temporary directory, which is never listed as
a step and is deleted when the next training run opens the manager.
"""

from __future__ import annotations

import json
import logging
import os
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE = "state"
DATA = "data"

# Config entries that decide the shapes and structure of the saved state; a checkpoint that does
# not fit is reported with the differences in these entries.
_MODEL_KEYS = ("model_name", "model", "t_length", "optimizer", "data.image_size", "data.channels")
_MAX_LISTED = 8
# The state entries inference restores (a partial restore of the saved train state).
_VARIABLES = ("params", "batch_stats")


# Replica-parallel saving splits a replicated array into one slice per replica, so that every
# device writes a part. Each slice is an eagerly dispatched `lax.slice`, compiled once per shape;
# for the many small arrays of a model (biases, BatchNorm statistics) that costs far more than it
# saves (measured: 5.4 s of a 4-device run's first save, against 0.3 s for the write itself).
# Arrays whose slices would be smaller than this are written whole by one replica; big ones
# (memory banks, a WideResNet teacher) are still split.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20
# The override is deliberate; orbax logs a warning for it ("Type handler registry type ...
# overriding jax.Array") that every `import dmad_jax.train` would print, so it is silenced here.
_absl_logger = logging.getLogger("absl")
_absl_level = _absl_logger.level
_absl_logger.setLevel(logging.ERROR)
try:
  ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL
    ),
    override=True,
  )
finally:
  _absl_logger.setLevel(_absl_level)


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model of the config (another model, other sizes)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, max_to_keep: int | None = 3, read_only: bool = False):
  """The run's CheckpointManager.

  A writing manager creates the directory and deletes temporary directories left by an
  interrupted save; a ``read_only`` one touches nothing.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=not read_only,
    read_only=read_only,
    cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=(STATE, DATA))


def latest_step(workdir: str, step: int | None = None) -> int:
  """``step`` (checked to exist) or the latest checkpoint step of ``workdir``.

  Raises:
    FileNotFoundError: when ``workdir`` has no checkpoint, or not ``step``.
  """
  steps = manager(workdir, read_only=True).all_steps()
  where = checkpoint_dir(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {where}: train first (dmad train ... --workdir)")
  if step is None:
    return max(steps)
  if int(step) not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {where} (have {sorted(steps)})")
  return int(step)


def save(mngr, step: int, state, data_iter=None) -> None:
  """Saves the state (and the data iterator position when given) at ``step``.

  The write continues in the background; ``mngr.wait_until_finished()`` waits for it.
  """
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(step, args=ocp.args.Composite(**items))


# ---------------------------------------------------------------------------------------------
# Restore, with a readable report when the checkpoint belongs to another model.
# ---------------------------------------------------------------------------------------------
def _path_name(path) -> str:
  """ "params/encoder/conv1/kernel" for a pytree key path (dict keys, attributes, indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    _path_name(p): tuple(int(d) for d in getattr(leaf, "shape", np.shape(leaf)))
    for p, leaf in leaves
  }


def _saved_shapes(step_dir: str) -> dict[str, tuple[int, ...]] | None:
  """Array shapes stored in ``<step_dir>/state``, or None when they cannot be read."""
  try:
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / STATE)
  except Exception:  # An unreadable layout falls back to orbax's own error at restore time.
    return None
  tree = getattr(meta, "item_metadata", meta)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(p): tuple(int(d) for d in leaf.shape) for p, leaf in leaves}


def shape_differences(saved: dict, wanted: dict, *, subset: bool = False) -> list[str]:
  """Human-readable differences between two ``{path: shape}`` maps (checkpoint vs config),
  parameters first and optimizer state (which mirrors the parameters) last. With ``subset``,
  entries only in the checkpoint are expected (a partial restore) and not listed."""
  if subset:
    saved = {k: v for k, v in saved.items() if k in wanted or k.split("/")[0] in _VARIABLES}
  out = [
    f"{k}: checkpoint {saved[k]}, this config {wanted[k]}"
    for k in sorted(saved.keys() & wanted.keys())
    if saved[k] != wanted[k]
  ]
  out += [f"{k} {wanted[k]}: only in this config" for k in sorted(wanted.keys() - saved.keys())]
  out += [f"{k} {saved[k]}: only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())]
  order = ("params/", "batch_stats/")
  return sorted(
    out, key=lambda line: next((i for i, p in enumerate(order) if line.startswith(p)), len(order))
  )


def _flat(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(saved_config_path: str, config) -> list[str]:
  """Model-defining entries (``_MODEL_KEYS``) in which ``config`` differs from a saved
  ``config.json``; empty when the file is missing or unreadable."""
  try:
    with open(saved_config_path) as f:
      saved = _flat(json.load(f))
    now = _flat(
      json.loads(
        config.to_json_best_effort()
        if hasattr(config, "to_json_best_effort")
        else json.dumps(dict(config), default=str)
      )
    )
  except (OSError, ValueError, TypeError):
    return []

  def relevant(key):
    return any(key == k or key.startswith(k + ".") for k in _MODEL_KEYS)

  keys = sorted(k for k in saved.keys() | now.keys() if relevant(k))
  missing = "<not set>"
  return [
    f"{k}: {saved.get(k, missing)!r} in the workdir's config, {now.get(k, missing)!r} now"
    for k in keys
    if saved.get(k, missing) != now.get(k, missing)
  ]


def _mismatch_message(step_dir: str, lines: list[str], config_lines: list[str]) -> str:
  workdir = os.path.dirname(os.path.dirname(step_dir))
  shown = "; ".join(lines[:_MAX_LISTED])
  more = f" (and {len(lines) - _MAX_LISTED} more)" if len(lines) > _MAX_LISTED else ""
  msg = (
    f"checkpoint {step_dir} does not fit the model of this config: the workdir {workdir} "
    f"belongs to another model. Differences: {shown}{more}."
  )
  if config_lines:
    msg += (
      f" The workdir's config ({os.path.join(workdir, 'config.json')}) differs in: "
      + "; ".join(config_lines[:_MAX_LISTED])
      + "."
    )
  return msg + " Use a new --workdir for this config, or the workdir's own config to resume it."


def check_process_count(step_dir: str, process_count: int) -> None:
  """Raises when the data positions in ``step_dir`` were saved by another number of processes.

  Each process saves its own grain iterator position (``data/process_<i>-of-<n>.json``), so
  resuming training needs the process count that wrote the checkpoint; restoring the model
  alone (the eval job, ``dmad predict``) works with any.
  """
  data_dir = os.path.join(step_dir, DATA)
  if not os.path.isdir(data_dir):
    return
  counts = set()
  for name in os.listdir(data_dir):
    m = re.fullmatch(r"process_\d+-of-(\d+)\.json", name)
    if m:
      counts.add(int(m.group(1)))
  if counts and counts != {process_count}:
    raise ValueError(
      f"{step_dir} was saved by {sorted(counts)[0]} processes and this run has "
      f"{process_count}: resuming training needs the same process count (each process saved its "
      "own data position). Rerun with that many processes; the eval job and `dmad predict` "
      "restore this checkpoint on any number."
    )


def _placed(abstract_tree):
  """``abstract_tree`` with every leaf that has no sharding placed on this process's first
  device, whatever topology (device count, process count) wrote the checkpoint."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def place(a):
    if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is None:
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device)
    return a

  return jax.tree.map(place, abstract_tree)


def restore(mngr, step: int, abstract_state, data_iter=None, *, config=None):
  """Restores ``step`` into the structure of ``abstract_state`` (and ``data_iter`` in place).

  Before reading any array the stored shapes are compared with ``abstract_state``, so a
  checkpoint of another model fails with the list of parameters that differ (and, given
  ``config``, the entries in which it differs from the workdir's ``config.json``).

  Args:
    mngr: a manager from :func:`manager`.
    step: the step to restore.
    abstract_state: the state's structure (``jax.ShapeDtypeStruct`` leaves, possibly sharded).
    data_iter: a fresh grain iterator of the run, set to the saved position in place.
    config: the config of this run, to name the differing config entries in errors.

  Returns:
    The restored state.

  Raises:
    CheckpointMismatchError: when the checkpoint does not fit the model of the config (another
      model, other sizes), naming the checkpoint directory and the differences.
  """
  step_dir = os.path.join(str(mngr.directory), str(step))
  config_path = os.path.join(os.path.dirname(str(mngr.directory)), "config.json")
  saved = _saved_shapes(step_dir)
  if saved is not None:
    lines = shape_differences(saved, _shapes(abstract_state))
    if lines:
      config_lines = [] if config is None else config_differences(config_path, config)
      raise CheckpointMismatchError(_mismatch_message(step_dir, lines, config_lines))
  if config is not None:
    # Arrays of the same shapes can belong to another model (other strides, offset ranges,
    # codebook kind): restoring them is allowed, but not silently.
    config_lines = config_differences(config_path, config)
    if config_lines:
      logging.getLogger(__name__).warning(
        "checkpoint %s fits this config's shapes, but the workdir's config (%s) differs in "
        "model-defining entries: %s. The restored model is the checkpoint's; use a new "
        "--workdir to train this config from scratch.",
        step_dir,
        config_path,
        "; ".join(config_lines[:_MAX_LISTED]),
      )
  abstract_state = _placed(abstract_state)
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    check_process_count(step_dir, jax.process_count())
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    config_lines = [] if config is None else config_differences(config_path, config)
    raise CheckpointMismatchError(_mismatch_message(step_dir, [str(e)], config_lines)) from e
  return restored[STATE]


def abstract(tree):
  """Shape/dtype structure of a pytree, for restoring without allocating twice."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_subset(workdir: str, step: int, abstract_subset, *, config=None):
  """Restores only the entries of ``abstract_subset`` (e.g. ``{"params", "batch_stats"}``) of
  the train state saved at ``step`` of ``workdir``: the rest (optimizer state, data position)
  is not read. Leaves are placed in the shardings ``abstract_subset`` carries.

  Raises:
    FileNotFoundError: when ``workdir`` has no checkpoint of ``step``.
    CheckpointMismatchError: when the checkpoint does not fit (see :func:`restore`).
  """
  directory = checkpoint_dir(workdir)
  step_dir = os.path.join(directory, str(int(step)))
  if not os.path.isdir(step_dir):
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}")
  config_path = os.path.join(os.path.abspath(workdir), "config.json")
  saved = _saved_shapes(step_dir)
  if saved is not None:
    lines = shape_differences(saved, _shapes(abstract_subset), subset=True)
    if lines:
      config_lines = [] if config is None else config_differences(config_path, config)
      raise CheckpointMismatchError(_mismatch_message(step_dir, lines, config_lines))
  mngr = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    item_handlers={STATE: ocp.PyTreeCheckpointHandler()},
  )
  target = _placed(abstract_subset)
  args = ocp.args.PyTreeRestore(
    item=target,
    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
    partial_restore=True,
  )
  try:
    restored = mngr.restore(int(step), args=ocp.args.Composite(**{STATE: args}))
  except (ValueError, KeyError, TypeError) as e:
    config_lines = [] if config is None else config_differences(config_path, config)
    raise CheckpointMismatchError(_mismatch_message(step_dir, [str(e)], config_lines)) from e
  finally:
    mngr.close()
  return restored[STATE]
