"""Multi-host start-up through JAX's own runtime (``jax.distributed``).

One process per host (per GPU host, TPU VM worker, or for debugging per local CPU process) calls
:func:`initialize` before any other JAX call. On Cloud TPU, SLURM, Open MPI and Kubernetes JAX
finds the coordinator, the process count and this process's id itself; elsewhere pass them (or
set ``JAX_COORDINATOR_ADDRESS``). Afterwards ``jax.devices()`` lists every device of every host,
the mesh of ``config.mesh`` spans them, each host's grain pipeline reads its own slice of every
global batch, and only process 0 writes logs, metrics and figures; orbax writes one checkpoint
from all processes together.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger("dmad_jax")

# How long a process waits at a barrier for the others (compiling a big model can take minutes).
BARRIER_TIMEOUT_MS = 60 * 60 * 1000


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins this process to the run (``jax.distributed.initialize``) and logs the topology.

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service; None = detect it
      from the cluster environment (TPU, SLURM, Open MPI, Kubernetes) or
      ``JAX_COORDINATOR_ADDRESS``.
    num_processes: number of processes; None = detect.
    process_id: this process's index in ``[0, num_processes)``; None = detect.

  Raises:
    ValueError: when only some of the three are given for a manual setup, or the id is out of
      range.
  """
  manual = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in manual) and any(v is None for v in manual[1:]):
    raise ValueError(
      "a manual multi-process start needs --num_processes and --process_id together "
      f"(got num_processes={num_processes}, process_id={process_id})"
    )
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  log.info(
    "process %d of %d: %d local devices of %d (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
  )


def compiled_everywhere(jitted, *args, name: str):
  """``jitted`` compiled for ``args`` (arrays or ``jax.ShapeDtypeStruct``), once every process
  has compiled it.

  With several processes, a program's first cross-process collective must come within a short
  timeout of every process reaching it (30 s for CPU's gloo collectives). Compile times differ
  between hosts, all the more with a persistent compilation cache that some hosts hit and others
  miss, so each process compiles first and all meet at a barrier of the coordination service
  (which waits as long as needed) before the program runs. With one process this is
  ``jitted`` itself, compiled on its first call.
  """
  if jax.process_count() == 1:
    return jitted
  compiled = jitted.lower(*args).compile()
  from orbax.checkpoint import multihost

  # A barrier of the coordination service's key-value store, not a collective.
  multihost.get_barrier_sync_fn()(key=f"dmad_compiled_{name}", timeout_ms=BARRIER_TIMEOUT_MS)
  return compiled
