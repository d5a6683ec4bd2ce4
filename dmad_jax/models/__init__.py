"""Detectors by name. Each exposes ``init``, ``loss`` and ``predict`` over data batches.

Optional hooks the trainer uses when a detector defines them: ``make_optimizer(cfg, total_steps,
params_shape)`` (its own optax transformation, e.g. one per parameter group),
``value_and_grad(params, batch_stats, batch, rng) -> ((loss, (terms, batch_stats)), grads)``
(gradients that are not those of one scalar loss, e.g. a GAN's two players) and
``calibrate(variables, batches) -> batch_stats`` (statistics of the training split stored with
every checkpoint, e.g. DAAD+'s score scaling).
"""

from __future__ import annotations


def plain(cfg) -> dict:
  """A ConfigDict / dict as a plain dict of plain values (tuples for lists, recursively), for
  building Flax modules and dataclasses from config sections. None gives {}."""
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()

  def tup(v):
    return tuple(tup(i) for i in v) if isinstance(v, list | tuple) else v

  return {k: tup(v) for k, v in dict(cfg).items()}


MODEL_NAMES = ("pdm", "daad", "daad_plus", "ppdm", "rd")


def get_detector(config):
  """The detector named by ``config.model_name``."""
  name = config.model_name
  if name == "pdm":
    from dmad_jax.models.pdm import PDMDetector

    return PDMDetector(config)
  if name == "daad":
    from dmad_jax.models.daad import DAADDetector

    return DAADDetector(config)
  if name == "daad_plus":
    from dmad_jax.models.daad import DAADPlusDetector

    return DAADPlusDetector(config)
  if name in ("ppdm", "rd"):
    from dmad_jax.models.ppdm import PPDMDetector

    return PPDMDetector(config, model_name=name)
  raise ValueError(f"unknown model_name {name!r}; known: {', '.join(MODEL_NAMES)}")
