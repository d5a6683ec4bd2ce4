"""Host memory of a training process on CPU: the compiler's scheduler, and handing freed memory
back to the operating system.

XLA:CPU orders a program's operations with a scheduler that favours running independent
operations concurrently; for a training step that keeps more activations alive at once. Its
memory-minimising scheduler (:data:`CPU_SCHEDULER_FLAG`) gives DMAD-PDM's Ped2 train step at
batch 4 2.02 GiB of temporary buffers instead of 2.60 GiB, at the same step time within this
machine's noise (``experiments/bench_train.py`` measures both). It is an ``XLA_FLAGS`` flag,
read once when the CPU backend starts (``Lowered.compile(compiler_options=...)`` accepts it but
the CPU compiler does not apply it), so ``dmad`` sets it before JAX starts
(:func:`use_memory_scheduler`); in a notebook or script, call that before the first JAX
computation or set ``XLA_FLAGS`` yourself. It changes nothing on GPU or TPU.

glibc's ``malloc`` keeps the heap pages that freed objects leave behind for later allocations.
Compiling a program frees most of what XLA and JAX built for it (traced and lowered modules,
LLVM state: about half a GiB for the same step), but the pages stay in the process's resident
memory, while the large buffers a step then allocates are mapped anew and do not reuse them:
the peak resident memory of a training process is that residue plus the step's buffers.
:func:`release` returns the residue (``malloc_trim(0)``); the trainer calls it once the state
exists and once the train step is compiled, before it runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os

__all__ = ["CPU_SCHEDULER_FLAG", "release", "use_memory_scheduler"]

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_memory_scheduler(environ=None) -> bool:
  """Adds :data:`CPU_SCHEDULER_FLAG` to ``XLA_FLAGS`` in ``environ`` (default ``os.environ``)
  unless that flag is already set there (then the user's value stands); True if added. Takes
  effect only before the CPU backend starts."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  name = CPU_SCHEDULER_FLAG.split("=")[0]
  if name in flags:
    return False
  environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()
  return True


@functools.cache
def _malloc_trim():
  """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
  name = ctypes.util.find_library("c")
  try:
    return ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):
    return None


def release() -> bool:
  """Collects garbage and returns free heap pages to the operating system; True where the C
  library can (glibc), False elsewhere (garbage is still collected)."""
  gc.collect()
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
