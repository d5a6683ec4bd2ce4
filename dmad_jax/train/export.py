"""The train step as a portable program: :func:`export_train_step`.

``jax.export`` serialises the jitted train step of a config's model and batch for the platforms
asked for (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``), from any host: it is the program an
accelerator would run (the CPU kernels and CPU-only rewrites are left out of every non-CPU
program, see ``dmad_jax.ops.cpu_kernels.by_platform``), for inspection, roofline figures, or
running where dmad_jax is not installed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from dmad_jax import data as data_lib
from dmad_jax.models import get_detector
from dmad_jax.ops import cpu_kernels
from dmad_jax.train import durations
from dmad_jax.train import state as state_lib
from dmad_jax.train.optim import learning_rate_schedule
from dmad_jax.train.trainer import train_step

__all__ = ["export_train_step"]


def export_train_step(
  config,
  *,
  platforms: Sequence[str] = ("cpu",),
  batch_size: int | None = None,
  total_steps: int | None = None,
) -> jax.export.Exported:
  """The jitted train step ``(state, batch) -> (state, metrics)`` of ``config``, exported.

  Shapes come from the config alone (no data is read): the model's state and a global batch of
  ``batch_size`` (default ``config.batch_size``) records of ``config.data``'s format.

  Args:
    config: a training config.
    platforms: lowering platforms.
    batch_size: the batch's leading dimension (default ``config.batch_size``).
    total_steps: the run length the learning-rate schedule decays over (default
      ``config.total_steps``; required for a config in epochs).

  Returns:
    A ``jax.export.Exported`` (``.mlir_module()`` is its StableHLO text).
  """
  detector = get_detector(config)
  spec = data_lib.element_spec(config.data)
  if total_steps is None:
    given = durations.given(config, "total")
    if given is None or given[0] != "steps":
      raise ValueError("export_train_step: the config's run is in epochs: pass total_steps=")
    total_steps = int(given[1])
  tx = state_lib.optimizer(config, detector, spec, total_steps)
  state = state_lib.abstract(config, detector, spec, tx)
  batch_size = int(batch_size or config.batch_size)
  batch = {k: jax.ShapeDtypeStruct((batch_size, *s.shape), s.dtype) for k, s in spec.items()}
  step = jax.jit(
    functools.partial(
      train_step,
      detector=detector,
      lr_schedule=learning_rate_schedule(config.optimizer, total_steps),
    ),
    donate_argnums=0,
  )
  with cpu_kernels.lowering_for(platforms):
    return jax.export.export(step, platforms=tuple(platforms))(state, batch)
