"""Device mesh and shardings from the config (jit + NamedSharding; no pmap).

``config.mesh`` lists (axis name, size) pairs, e.g. ``[("data", -1)]`` (every device on the data
axis; -1 = what is left). Batches are sharded along ``data``; parameters and optimizer state
are replicated. Under ``jax.jit`` with a sharded batch, BatchNorm statistics and VQ code usage
are computed over the global batch: XLA inserts the cross-device reductions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


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


def data_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh) -> NamedSharding:
  """The same value on every device."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh) -> None:
  """The global batch must split evenly over the data axis."""
  n = mesh.shape[DATA]
  if batch_size % n:
    raise ValueError(
      f"batch_size {batch_size} is not divisible by the number of devices {n} on the mesh's "
      f"'{DATA}' axis"
    )


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """This process's part of a batch as global arrays sharded along ``data``."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
