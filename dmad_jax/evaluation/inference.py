"""The inference runner: one jitted function of (variables, batch) over exact passes of data.

Every consumer of a detector's functions on whole splits goes through :class:`Runner`: the eval
job (``predict`` on the test split, also under ``--watch``), calibration (``predict`` on the
calibration split), ``dmad predict`` (``predict`` on arrays) and the trainer's statistics step
(``statistics`` on the training split). A runner pads the last batch (a ``_mask`` marks real
rows), shards each batch over the mesh, runs the function jitted once (the compiled program is
reused for every pass and every checkpoint of the same shapes), gathers the outputs on every
process and drops the padding, so each record is seen exactly once whatever the batch size,
device or process count.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from dmad_jax import data as data_lib
from dmad_jax.ops import cpu_kernels
from dmad_jax.train import distributed, sharding

__all__ = ["Runner"]

_SERIALS = itertools.count()


class Runner:
  """``fn(variables, batch)`` jitted once, run over sources or arrays.

  Attributes:
    batch_size: global batch size of every call.
    traces: how many times ``fn`` was traced (1 after any number of same-shaped passes).
  """

  def __init__(
    self,
    fn: Callable,
    *,
    mesh,
    variables_sharding,
    batch_size: int,
    keep: Sequence[str] = ("label", "index"),
    stateful: bool = False,
  ):
    """Args:
    fn: a pure function of (variables, batch dict) returning a pytree with the batch first;
      with ``stateful``, of (variables, state, batch, real) returning (that pytree, new state),
      where ``real`` (B,) is False on padding rows (a detector's ``predict_sequential``).
    mesh: the device mesh the batch is split over.
    variables_sharding: the shardings of the variables ``fn`` is called with.
    batch_size: global batch size (must split over the mesh's batch devices).
    keep: record entries returned next to ``fn``'s outputs (those a batch has).
    stateful: carry ``fn``'s state from batch to batch (replicated) through :meth:`over`.
    """
    sharding.check_batch_size(batch_size, mesh)
    self.batch_size = int(batch_size)
    self.traces = 0
    self.stateful = bool(stateful)
    self._ready = False
    # Runners are built in the same order on every process: the serial names their barrier.
    self._serial = next(_SERIALS)
    self._keep = tuple(keep)
    self._data_sh = sharding.data_sharding(mesh)
    rep = sharding.replicated(mesh)

    def kept_of(batch):
      return {k: batch[k] for k in (*self._keep, data_lib.MASK_KEY) if k in batch}

    def run(variables, batch):
      self.traces += 1
      return fn(variables, batch), kept_of(batch)

    def run_stateful(variables, state, batch):
      self.traces += 1
      out, state = fn(variables, state, batch, batch[data_lib.MASK_KEY])
      return (out, kept_of(batch)), state

    run = cpu_kernels.traced_for_devices(run, mesh.devices.flat)
    run_stateful = cpu_kernels.traced_for_devices(run_stateful, mesh.devices.flat)
    # Replicated outputs: every process holds the whole global batch (gathered over hosts).
    if self.stateful:
      self._jit = jax.jit(
        run_stateful,
        in_shardings=(variables_sharding, rep, self._data_sh),
        out_shardings=(rep, rep),
      )
    else:
      self._jit = jax.jit(run, in_shardings=(variables_sharding, self._data_sh), out_shardings=rep)

  def _call(self, variables, local_batch: Mapping[str, np.ndarray], state=None):
    batch = sharding.global_batch(dict(local_batch), self._data_sh)
    args = (variables, state, batch) if self.stateful else (variables, batch)
    if jax.process_count() > 1 and not self._ready:
      # Every process compiles before any runs the program's collectives (see
      # distributed.compiled_everywhere); the jit cache then holds the executable.
      distributed.compiled_everywhere(self._jit, *args, name=f"runner{self._serial}")
      self._ready = True
    if self.stateful:
      result, state = self._jit(*args)
    else:
      result = self._jit(*args)
    out, kept = jax.device_get(result)
    real = np.asarray(kept.pop(data_lib.MASK_KEY), bool)
    out = jax.tree.map(lambda a: np.asarray(a)[real], out)
    kept = {k: np.asarray(v)[real] for k, v in kept.items()}
    return (out, kept, state) if self.stateful else (out, kept)

  def over(self, variables, source, state=None) -> Iterator[tuple[object, dict]]:
    """``(outputs, kept entries)`` of every batch of one exact pass over ``source``, as NumPy,
    padding rows dropped; together the batches hold every record once, in order. A stateful
    runner starts from ``state`` and carries it through the batches in order."""
    if self.stateful and state is None:
      raise ValueError("a stateful Runner needs the state its pass starts from")
    for batch in data_lib.make_eval_batches(
      source,
      global_batch_size=self.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ):
      if self.stateful:
        out, kept, state = self._call(variables, batch, state)
        yield out, kept
      else:
        yield self._call(variables, batch)

  def collect(self, variables, source) -> tuple[object, dict]:
    """:meth:`over`, concatenated: the outputs and kept entries of every record of ``source``."""
    outs, kept = zip(*self.over(variables, source), strict=True)
    cat = lambda *xs: np.concatenate(xs)  # noqa: E731
    return jax.tree.map(cat, *outs), jax.tree.map(cat, *kept)

  def on_arrays(self, variables, inputs: Mapping[str, np.ndarray]):
    """The outputs for whole arrays (one process): ``inputs`` are batches of any length, run in
    chunks of ``batch_size``, the last one padded with zeros."""
    if self.stateful:
      raise ValueError("on_arrays runs a stateless function; this Runner carries a state")
    n = len(next(iter(inputs.values())))
    outs = []
    for start in range(0, n, self.batch_size):
      chunk = {k: np.asarray(v[start : start + self.batch_size]) for k, v in inputs.items()}
      real = len(next(iter(chunk.values())))
      pad = self.batch_size - real
      chunk = {
        k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()
      }
      chunk[data_lib.MASK_KEY] = np.arange(self.batch_size) < real
      outs.append(self._call(variables, chunk)[0])
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
