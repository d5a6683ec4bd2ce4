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
  ):
    """Args:
    fn: a pure function of (variables, batch dict) returning a pytree with the batch first.
    mesh: the device mesh the batch is split over.
    variables_sharding: the shardings of the variables ``fn`` is called with.
    batch_size: global batch size (must split over the mesh's batch devices).
    keep: record entries returned next to ``fn``'s outputs (those a batch has).
    """
    sharding.check_batch_size(batch_size, mesh)
    self.batch_size = int(batch_size)
    self.traces = 0
    self._ready = False
    # Runners are built in the same order on every process: the serial names their barrier.
    self._serial = next(_SERIALS)
    self._keep = tuple(keep)
    self._data_sh = sharding.data_sharding(mesh)

    def run(variables, batch):
      self.traces += 1
      kept = {k: batch[k] for k in (*self._keep, data_lib.MASK_KEY) if k in batch}
      return fn(variables, batch), kept

    # Replicated outputs: every process holds the whole global batch (gathered over hosts).
    self._jit = jax.jit(
      run,
      in_shardings=(variables_sharding, self._data_sh),
      out_shardings=sharding.replicated(mesh),
    )

  def _call(self, variables, local_batch: Mapping[str, np.ndarray]):
    batch = sharding.global_batch(dict(local_batch), self._data_sh)
    if jax.process_count() > 1 and not self._ready:
      # Every process compiles before any runs the program's collectives (see
      # distributed.compiled_everywhere); the jit cache then holds the executable.
      distributed.compiled_everywhere(self._jit, variables, batch, name=f"runner{self._serial}")
      self._ready = True
    out, kept = jax.device_get(self._jit(variables, batch))
    real = np.asarray(kept.pop(data_lib.MASK_KEY), bool)
    out = jax.tree.map(lambda a: np.asarray(a)[real], out)
    return out, {k: np.asarray(v)[real] for k, v in kept.items()}

  def over(self, variables, source) -> Iterator[tuple[object, dict]]:
    """``(outputs, kept entries)`` of every batch of one exact pass over ``source``, as NumPy,
    padding rows dropped; together the batches hold every record once, in order."""
    for batch in data_lib.make_eval_batches(
      source,
      global_batch_size=self.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ):
      yield self._call(variables, batch)

  def collect(self, variables, source) -> tuple[object, dict]:
    """:meth:`over`, concatenated: the outputs and kept entries of every record of ``source``."""
    outs, kept = zip(*self.over(variables, source), strict=True)
    cat = lambda *xs: np.concatenate(xs)  # noqa: E731
    return jax.tree.map(cat, *outs), jax.tree.map(cat, *kept)

  def on_arrays(self, variables, inputs: Mapping[str, np.ndarray]):
    """The outputs for whole arrays (one process): ``inputs`` are batches of any length, run in
    chunks of ``batch_size``, the last one padded with zeros."""
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
