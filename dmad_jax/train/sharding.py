"""Device mesh and shardings from the config (jit + NamedSharding; no pmap).

``config.mesh`` lists (axis name, size) pairs, e.g. ``[("data", -1)]`` (every device on the data
axis; -1 = what is left) or ``[("data", 2), ("fsdp", 4)]``. Batches are split over every device
(``data`` and ``fsdp`` together). Parameters and optimizer state are replicated over ``data``;
with an ``fsdp`` axis, every array of at least ``fsdp_min_size`` values (big memory banks, a
WideResNet teacher) is split along its largest dimension that ``fsdp`` divides, and XLA gathers
it where it is used (ZeRO-3 / FSDP style). Shardings are derived from ``jax.eval_shape`` of the
state, so the state is created already sharded. Under ``jax.jit`` with a sharded batch, BatchNorm
statistics and VQ code usage are computed over the global batch: XLA inserts the cross-device
reductions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"


def make_mesh(mesh_spec: Sequence | None = None, devices=None) -> jax.sharding.Mesh:
  """A mesh with the named axes of ``mesh_spec`` over ``devices`` (default: all devices).

  One axis may have size -1 (all remaining devices). A mesh that needs fewer devices than there
  are uses the first ones (handy for comparing with a single-device run).

  Raises:
    ValueError: when the mesh needs more devices than there are, or -1 cannot be resolved.
  """
  devices = list(jax.devices() if devices is None else devices)
  spec = [tuple(a) for a in (mesh_spec or [(DATA, -1)])]
  names = [str(n) for n, _ in spec]
  sizes = [int(s) for _, s in spec]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1 or (-1 in sizes and len(devices) % known):
    raise ValueError(f"mesh {spec} does not fit {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) > len(devices):
    raise ValueError(f"mesh {spec} needs {math.prod(sizes)} devices, {len(devices)} available")
  used = devices[: math.prod(sizes)]
  return jax.sharding.Mesh(np.asarray(used).reshape(sizes), names)


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes a batch is split over: ``data`` and, when present, ``fsdp``."""
  return tuple(a for a in (DATA, FSDP) if a in mesh.shape)


def data_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over the batch axes (``data``, and ``fsdp`` when present)."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh) -> NamedSharding:
  """The same value on every device."""
  return NamedSharding(mesh, P())


def batch_devices(mesh) -> int:
  """How many devices share each batch."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def check_batch_size(batch_size: int, mesh) -> None:
  """The global batch must split evenly over the devices of the batch axes."""
  n = batch_devices(mesh)
  if batch_size % n:
    axes = "' x '".join(batch_axes(mesh))
    raise ValueError(
      f"batch_size {batch_size} is not divisible by the number of devices {n} on the mesh's "
      f"'{axes}' axis: choose a batch size that is a multiple of {n}"
    )


def _fsdp_spec(shape, fsdp: int, min_size: int) -> P:
  """Split the largest dimension that ``fsdp`` divides, for arrays of >= ``min_size`` values."""
  if fsdp <= 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*([None] * dim + [FSDP]))
  return P()


def state_shardings(abstract_state, mesh, *, fsdp_min_size: int = 2**18):
  """A NamedSharding for every leaf of ``abstract_state`` (e.g. from ``jax.eval_shape``).

  Replicated on meshes without an ``fsdp`` axis; otherwise leaves of at least
  ``fsdp_min_size`` values are split along ``fsdp`` (see the module docstring).
  """
  fsdp = mesh.shape.get(FSDP, 1)
  return jax.tree.map(
    lambda a: NamedSharding(mesh, _fsdp_spec(tuple(a.shape), fsdp, fsdp_min_size)),
    abstract_state,
  )


def with_shardings(abstract_state, shardings):
  """``abstract_state`` as ShapeDtypeStructs that carry ``shardings`` (for orbax restore)."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's part of a batch as global arrays sharded along ``data``."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
