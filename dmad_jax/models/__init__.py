"""Detectors by name: ``get_detector(config)`` builds ``config.model_name``'s detector.

Every module of this package that defines a :class:`~dmad_jax.models.base.Detector` registers
it with ``@register(name)``; see :mod:`dmad_jax.models.base` for the interface.
"""

from dmad_jax.models.base import Detector, Prediction, get_detector, names, register

__all__ = ["Detector", "Prediction", "get_detector", "names", "register"]
