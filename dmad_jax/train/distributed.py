"""Multi-host start-up through JAX's own runtime (``jax.distributed``).

One process per host (per GPU host, TPU VM worker, or for debugging per local CPU process) calls
:func:`initialize` before any other JAX call. On Cloud TPU, SLURM, Open MPI and Kubernetes JAX
finds the coordinator, the process count and this process's id itself; elsewhere pass them (or
set ``JAX_COORDINATOR_ADDRESS``). Afterwards ``jax.devices()`` lists every device of every host,
the mesh of ``config.mesh`` spans them, each host's grain pipeline reads its own slice of every
global batch, and only process 0 writes logs, metrics and figures; orbax writes one checkpoint
from all processes together.

Preemption and lost hosts (exercised by tests/train/preemption_test.py with 2 local processes):

- SIGTERM to any process (a TPU or spot-VM preemption notice, often not on every host at once) is
  caught by JAX's preemption service, which picks one step at which every process stops: each
  finishes that step, all of them save it as one checkpoint (with every process's data-iterator
  position), and ``dmad train`` exits with status 143. Rerunning the same command on every host
  resumes there and ends bit-identical to an uninterrupted run.
- A process that dies without notice (SIGKILL, a lost VM) stops sending heartbeats to the
  coordination service; the service then stops every other process within
  ``heartbeat_timeout_seconds`` (JAX aborts them, exit status 134, logging "The following tasks
  are unhealthy (stopped sending heartbeats)" followed by the lost process ids; when process 0,
  which hosts the service, is the one lost, the others stop as soon as their next call to it
  fails). Checkpoints are committed only once every process has written its part, so the last
  complete one is intact and a rerun of all processes resumes from it.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger("dmad_jax")

# How long a process waits at a barrier for the others (compiling a big model can take minutes).
BARRIER_TIMEOUT_MS = 60 * 60 * 1000
# JAX's defaults: a process that sent no heartbeat for this long is declared lost and the others
# are stopped; at exit, how long a process waits for the others to reach the shutdown barrier.
HEARTBEAT_TIMEOUT_SECONDS = 100
SHUTDOWN_TIMEOUT_SECONDS = 300


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS,
  shutdown_timeout_seconds: int = SHUTDOWN_TIMEOUT_SECONDS,
) -> None:
  """Joins this process to the run (``jax.distributed.initialize``) and logs the topology.

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service; None = detect it
      from the cluster environment (TPU, SLURM, Open MPI, Kubernetes) or
      ``JAX_COORDINATOR_ADDRESS``.
    num_processes: number of processes; None = detect.
    process_id: this process's index in ``[0, num_processes)``; None = detect.
    heartbeat_timeout_seconds: how long the coordination service waits for a silent process
      before it stops all the others (the bound on how long survivors wait for a lost host).
    shutdown_timeout_seconds: how long a finishing process waits for the others at exit.

  Raises:
    ValueError: when only some of the three are given for a manual setup, the id is out of
      range, or a timeout is not positive.
  """
  manual = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in manual) and any(v is None for v in manual[1:]):
    raise ValueError(
      "a manual multi-process start needs --num_processes and --process_id together "
      f"(got num_processes={num_processes}, process_id={process_id})"
    )
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
  for name, value in (
    ("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
    ("shutdown_timeout_seconds", shutdown_timeout_seconds),
  ):
    if value <= 0:
      raise ValueError(f"{name} must be a positive number of seconds, got {value}")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
    shutdown_timeout_seconds=int(shutdown_timeout_seconds),
  )
  log.info(
    "process %d of %d: %d local devices of %d (%s); a lost process stops the others within "
    "%d s (heartbeat timeout)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].platform,
    heartbeat_timeout_seconds,
  )


def compiled_everywhere(jitted, *args, name: str, always: bool = False):
  """``jitted`` compiled for ``args`` (arrays or ``jax.ShapeDtypeStruct``), once every process
  has compiled it.

  With several processes, a program's first cross-process collective must come within a short
  timeout of every process reaching it (30 s for CPU's gloo collectives). Compile times differ
  between hosts, all the more with a persistent compilation cache that some hosts hit and others
  miss, so each process compiles first and all meet at a barrier of the coordination service
  (which waits as long as needed) before the program runs. With one process this is
  ``jitted`` itself, compiled on its first call, unless ``always`` (then it is compiled here).
  """
  if jax.process_count() == 1 and not always:
    return jitted
  compiled = jitted.lower(*args).compile()
  if jax.process_count() == 1:
    return compiled
  from orbax.checkpoint import multihost

  # A barrier of the coordination service's key-value store, not a collective.
  multihost.get_barrier_sync_fn()(key=f"dmad_compiled_{name}", timeout_ms=BARRIER_TIMEOUT_MS)
  return compiled
