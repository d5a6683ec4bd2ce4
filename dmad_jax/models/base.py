"""The detector interface: what the trainer, the eval job, calibration and ``dmad predict`` call.

A detector is one class in one file of ``dmad_jax/models/`` (or anywhere, registered with
:func:`register`). It implements three pure functions over batches of the data sources' records
and declares what it produces; everything else has a default:

* ``init(rng, batch) -> {"params", "batch_stats"}``;
* ``loss(params, batch_stats, batch, rng) -> (loss, (terms, new_batch_stats))``;
* ``predict(variables, batch) -> Prediction``: image scores by name (``"score"`` is the one
  thresholds and figures use), optionally pixel maps and pictures for the figures;
* ``score_names``: the names ``predict`` returns, every one reported by the eval job;
  ``pixel_map``: the map scored against ground-truth masks (None: none);
  ``figure_rows``: the pictures of the eval figure, in order.

Optional hooks (defaults in :class:`Detector`): ``predict_state`` / ``predict_sequential``
(a state carried through the eval job's pass over the test split in order, e.g. MNAD's
test-time memory update); ``value_and_grad`` (gradients that are not those
of one scalar loss, e.g. a GAN's players); ``optimizer_groups`` (parts of the model with an
optimizer of their own, declared as data); ``statistics`` (values over the training split whose
extrema are kept in the checkpoint, e.g. score ranges for min-max scaling); ``fit_to_data``
(values estimated from the training split before training and every ``refit_every`` steps, kept
in ``batch_stats`` and used by the loss, e.g. IGD's Gaussian centre and width: the E-step of an
EM scheme); ``data_init`` (initial parameter values estimated from the training data, e.g.
PDM's background template).

Precision: ``config.compute_dtype`` ("float32" or "bfloat16") is the dtype modules compute in;
a detector applies its Flax modules through :meth:`Detector.apply`, which keeps parameters,
statistics, losses and scores in float32 (``dmad_jax.nn.precision``).

Config: a detector reads only the sections it declares in ``config_sections`` (plus the top-level
keys in ``config_keys``), each through :func:`dmad_jax.configs.schema.section`, which refuses an
unknown key with the closest known one.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import functools
import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dmad_jax.configs import schema
from dmad_jax.nn import precision, remat
from dmad_jax.ops import cpu_kernels

__all__ = [
  "Detector",
  "ImageFile",
  "MedianImage",
  "Prediction",
  "TemplateBank",
  "TwoPlayer",
  "get_detector",
  "names",
  "register",
]

# Key of the statistics the trainer fits on the training split (see Detector.statistics).
STATISTICS = "score_stats"


@flax.struct.dataclass
class Prediction:
  """What ``Detector.predict`` returns for a batch of B records (a pytree: jit returns it).

  Attributes:
    scores: image scores by name, (B,) each, higher = more anomalous; ``"score"`` is the main one.
    maps: pixel maps by name, (B, H, W).
    images: pictures for the figures by name, (B, H, W, C) in [-1, 1].
    frame_errors: per-record errors that a video score recipe fuses into frame scores, named
      with the recipe's prefix (``dmad_jax.evaluation.video.ERROR_PREFIX``, e.g. ``ped2_``).
    host_maps: per-record maps that the eval job turns into scores on the host (video recipes
      that need the previous frames or connected components).
  """

  scores: dict[str, jax.Array]
  maps: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  images: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  frame_errors: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  host_maps: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Initial values from the training data, requested by Detector.data_init.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MedianImage:
  """The per-pixel median of up to ``max_items`` training records' ``"image"``, (H, W, C)."""

  max_items: int = 2000


@dataclasses.dataclass(frozen=True)
class TemplateBank:
  """One background template per template index of a video source, (T, H, W, 3) in [-1, 1]
  (``dmad_jax.data.templates.template_bank``)."""

  method: str = "hist_mode"
  max_frames: int | None = None


@dataclasses.dataclass(frozen=True)
class ImageFile:
  """An image file read at the training records' size and channels, in [-1, 1] (gray frames
  repeated to 3 channels as the video source repeats them)."""

  path: str


# ---------------------------------------------------------------------------------------------
# The interface.
# ---------------------------------------------------------------------------------------------
class Detector(abc.ABC):
  """Base class of every detector; see the module docstring for the contract.

  Subclasses set ``config_sections`` ({section name: schema}) and read them with
  :meth:`section` in ``__init__``.
  """

  name: ClassVar[str] = ""  # set by @register
  config_sections: ClassVar[Mapping[str, Any]] = {}
  config_keys: ClassVar[tuple[str, ...]] = ()
  figure_rows: tuple[str, ...] = ("input",)
  pixel_map: str | None = None
  # Top-level parameters that :meth:`apply` keeps in float32 whatever the compute dtype
  # (parameters that are images, e.g. PDM's background templates).
  float32_params: ClassVar[tuple[str, ...]] = ()

  def __init__(self, config):
    self.config = config

  def section(self, name: str, *, extra=()) -> dict:
    """The config section ``name`` checked against ``config_sections[name]``."""
    return schema.section(self.config, name, self.config_sections[name], extra=extra)

  # -- required ------------------------------------------------------------------------------
  @property
  @abc.abstractmethod
  def score_names(self) -> tuple[str, ...]:
    """Every image score ``predict`` returns; ``"score"`` first."""

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> dict:
    """Variables ``{"params", "batch_stats"}`` for a batch of the training records' format."""

  @abc.abstractmethod
  def loss(self, params, batch_stats, batch, rng) -> tuple[jax.Array, tuple[dict, Any]]:
    """The training loss: ``(loss, (terms, new_batch_stats))``; ``terms`` are logged."""

  @abc.abstractmethod
  def predict(self, variables: dict, batch: Mapping[str, jax.Array]) -> Prediction:
    """Scores (and maps, pictures) of a batch, eval-mode."""

  # -- helpers -------------------------------------------------------------------------------
  @property
  def compute_dtype(self) -> jnp.dtype:
    """The dtype the modules compute in (``config.compute_dtype``; float32 by default)."""
    return precision.compute_dtype(self.config)

  def apply(self, module, variables: dict, *args, **kwargs):
    """``module.apply(variables, *args, **kwargs)`` in the compute dtype: the ``params``
    collection (but :attr:`float32_params`) and the floating array arguments are cast to
    :attr:`compute_dtype` and every floating output (mutated collections included) is cast
    back to float32, so what a loss, a score or the optimizer sees is float32 (see
    ``dmad_jax.nn.precision``). With ``config.remat`` set, the application is a
    ``jax.checkpoint`` with that policy (``dmad_jax.nn.remat``). In float32 without remat it
    is ``module.apply`` itself."""
    dtype = self.compute_dtype
    policy = remat.policy(self.config)
    if dtype != jnp.float32:
      args, kwargs = precision.cast_floating((args, kwargs), dtype)
      variables = precision.for_compute(variables, dtype, keep=self.float32_params)
    if policy is None:
      out = module.apply(variables, *args, **kwargs)
    else:  # only arrays pass through jax.checkpoint; flags and method names are closed over
      out = jax.checkpoint(functools.partial(module.apply, **kwargs), policy=policy)(
        variables, *args
      )
    return out if dtype == jnp.float32 else precision.cast_floating(out, jnp.float32)

  def compiled_init(self, fn, *args):
    """``fn(*args)`` as one compiled program (jitted once per detector and ``fn``) with the
    classic, not the partitionable, threefry: an ``init`` of many layers otherwise dispatches op
    by op, and XLA:CPU compiled the partitionable threefry's differently shaped draws about 5x
    slower (DAAD's test-sized generator: 11 s against 2.4 s). Parameters are drawn replicated,
    so nothing is lost; the values are as deterministic, just other ones."""
    cache = self.__dict__.setdefault("_compiled_inits", {})
    if fn not in cache:  # run on the default device: traced for its platform
      cache[fn] = jax.jit(cpu_kernels.traced_for_devices(fn, jax.local_devices()))
    with jax.threefry_partitionable(False):
      return cache[fn](*args)

  # -- optional hooks ------------------------------------------------------------------------
  def value_and_grad(self, params, batch_stats, batch, rng):
    """``((loss, (terms, new_batch_stats)), grads)``; by default the gradient of :meth:`loss`."""
    return jax.value_and_grad(self.loss, has_aux=True)(params, batch_stats, batch, rng)

  def optimizer_groups(self) -> Mapping[str, str] | None:
    """``{top-level params key: config section of its optimizer}`` when parts of the model
    are trained by optimizers of their own (one optax state each); None: every parameter by
    ``config.optimizer``."""
    return None

  def statistics(self, variables: dict, batch: Mapping[str, jax.Array]) -> dict | None:
    """Per-record values of a batch of the training split, or None (the default) when the
    detector keeps no statistics.

    The trainer runs this over the whole training split before every checkpoint and stores, in
    ``batch_stats["score_stats"]``, the minimum over the split of every key ending in ``_min``
    and the maximum of every key ending in ``_max`` (plus ``calibrated = 1``). ``init`` must
    declare every one of them, ``calibrated`` included (the values used until the first
    checkpoint).
    """
    del variables, batch
    return None

  def fit_to_data(self, variables: dict, collect) -> dict | None:
    """Values estimated from the training split, or None (the default: nothing is fitted).

    The trainer calls it before step 1 and then before every step that follows a multiple of
    ``config.refit_every_steps`` (or ``refit_every_epochs``); the values are saved with the
    state, so a resumed run fits where the uninterrupted one did.
    ``collect(fn)`` runs the pure ``fn(variables, batch) -> {name: (B, ...) array}`` over one
    exact pass of the training split (jitted and sharded as the eval job runs ``predict``; no
    augmentation, records in order, padding dropped) with the current ``variables`` and returns
    ``{name: numpy array over all records}``; it may be called several times (e.g. a centre, then
    a width around it).

    Returns:
      ``{batch_stats key: {name: array}}``: each replaces that entry of ``batch_stats``, which
      ``init`` must declare with the same names and shapes.
    """
    del variables, collect
    return None

  @property
  def fits_data(self) -> bool:
    """Whether :meth:`fit_to_data` is implemented (the trainer then reads the training split)."""
    return type(self).fit_to_data is not Detector.fit_to_data

  @property
  def fits_statistics(self) -> bool:
    """Whether :meth:`statistics` is implemented (the trainer then reads the training split)."""
    return type(self).statistics is not Detector.statistics

  def predict_state(self, variables: dict) -> Any:
    """The state a sequential pass over the test split starts from, or None (the default:
    ``predict`` is stateless). A detector that returns one implements
    :meth:`predict_sequential`, and the eval job scores the test split with it, batch after
    batch in the split's order (e.g. MNAD's test-time memory update)."""
    del variables
    return None

  def predict_sequential(
    self, variables: dict, state: Any, batch: Mapping[str, jax.Array], real: jax.Array
  ) -> tuple[Prediction, Any]:
    """``(Prediction, state after the batch)``: the batch's records in order, each scored with
    the state left by the records before it. ``real`` (B,) is False on padding records, which
    must leave the state unchanged. Pure: the eval job jits it and carries the state. By
    default: :meth:`predict`, the state passed through unchanged."""
    del real
    return self.predict(variables, batch), state

  @property
  def sequential(self) -> bool:
    """Whether the eval job scores with :meth:`predict_sequential` (see :meth:`predict_state`)."""
    return type(self).predict_state is not Detector.predict_state

  # Score names (of ``predict`` or :meth:`test_selected_scores`) of which the authors report the
  # best image AUROC on the test split (PPDM: max(AUROC(fused), AUROC(rec))); () = none.
  reported_best_of: ClassVar[tuple[str, ...]] = ()

  def test_selected_scores(self, scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Image scores recomputed from the whole test split's ``scores`` (host arrays of every
    test record), as some released evaluations do, e.g. min-max ranges taken over the test set;
    {} (the default) when the detector has none. The eval job reports their AUROCs only with
    ``eval.test_selected`` and always with a ``_test_selected`` suffix: they use the test labels'
    split to set the scoring, so they are never the default numbers."""
    del scores
    return {}

  def data_init(self) -> MedianImage | TemplateBank | ImageFile | None:
    """The initial value this detector estimates from the training data (None: none)."""
    return None

  def apply_data_init(self, params: dict, value: np.ndarray) -> dict:
    """``params`` with the value requested by :meth:`data_init` put in place."""
    del value
    return params


class TwoPlayer:
  """Mixin for a detector whose step trains two players (a GAN: generator and critic).

  The subclass's ``_objective(params, batch_stats, batch, rng) -> (sum, (terms, batch_stats))``
  adds both players' losses, each computed with the other player's values stop-gradient'ed, so the
  gradient of the sum w.r.t. one player is that of its own loss: one backward pass gives both.
  ``player_terms`` names the two losses in ``terms``; the first is the one logged as the loss.
  Put it before the detector base class: ``class D(base.TwoPlayer, base.Detector)``.
  """

  player_terms: ClassVar[tuple[str, str]] = ("generator_loss", "discriminator_loss")

  def _reported(self, terms):
    # The first player's loss is logged; adding 0 * the other's makes it non-finite when either
    # is, so the trainer's NaN guard covers both players.
    first, second = self.player_terms
    return terms[first] + 0.0 * terms[second]

  def loss(self, params, batch_stats, batch, rng):
    """(the first player's loss, (terms, new_batch_stats)); the terms hold both losses."""
    _, (terms, stats) = self._objective(params, batch_stats, batch, rng)
    return self._reported(terms), (terms, stats)

  def value_and_grad(self, params, batch_stats, batch, rng):
    """``((loss, (terms, batch_stats)), grads)``: each player's gradient is that of its own
    loss."""
    (_, (terms, stats)), grads = jax.value_and_grad(self._objective, has_aux=True)(
      params, batch_stats, batch, rng
    )
    return (self._reported(terms), (terms, stats)), grads


def min_max_scale(value: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """``(value - lo) / (hi - lo)``: [lo, hi] onto [0, 1] (a zero-width range divides by 1), the
  scaling that fitted statistics are kept for."""
  width = hi - lo
  return (value - lo) / jnp.where(width > 0, width, 1.0)


def min_max_over(values: np.ndarray) -> np.ndarray:
  """(v - min) / (max - min) over ``values`` themselves (a zero-width range divides by 1): the
  test-set scaling of the released PPDM and DAAD+ evaluations."""
  values = np.asarray(values, np.float64)
  width = values.max() - values.min()
  return (values - values.min()) / (width if width > 0 else 1.0)


def reduce_statistics(rows: Mapping[str, np.ndarray]) -> dict[str, jnp.ndarray]:
  """The stored statistics of :meth:`Detector.statistics` rows collected over a split.

  Raises:
    ValueError: for a key without a ``_min`` / ``_max`` suffix, no rows, or non-finite values.
  """
  out = {}
  for key, values in rows.items():
    values = np.asarray(values, np.float64)
    if not values.size:
      raise ValueError(f"statistics {key!r}: no training records to compute it from")
    if key.endswith("_min"):
      value = values.min()
    elif key.endswith("_max"):
      value = values.max()
    else:
      raise ValueError(f"statistics key {key!r} must end in '_min' or '_max'")
    if not np.isfinite(value):
      raise ValueError(f"statistics {key!r} is not finite on the training split: {value}")
    out[key] = jnp.asarray(value, jnp.float32)
  out["calibrated"] = jnp.ones((), jnp.float32)
  return out


# ---------------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Detector]] = {}


def register(name: str):
  """Class decorator: makes a :class:`Detector` subclass available as ``model_name = name``."""

  def wrap(cls: type[Detector]) -> type[Detector]:
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
      raise TypeError(f"register({name!r}): {cls!r} is not a Detector subclass")
    known = _REGISTRY.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
      raise ValueError(f"model name {name!r} is already registered by {known.__qualname__}")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return wrap


def _import_package_models() -> None:
  """Imports every module of ``dmad_jax.models``, so their detectors register themselves."""
  package = importlib.import_module("dmad_jax.models")
  for info in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"dmad_jax.models.{info.name}")


def names() -> tuple[str, ...]:
  """Every registered model name (the package's and any registered since)."""
  _import_package_models()
  return tuple(sorted(_REGISTRY))


def get_detector(config) -> Detector:
  """The detector named by ``config.model_name``, built from ``config``.

  Raises:
    ConfigError: for an unknown name (listing the known ones and the closest) or a config
      section the detector does not accept.
  """
  name = config.get("model_name", None) if hasattr(config, "get") else None
  if name not in _REGISTRY:
    known = names()
    if name not in _REGISTRY:
      close = difflib.get_close_matches(str(name), known, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise schema.ConfigError(
        f"unknown config.model_name {name!r}{hint}; known: {', '.join(known)}"
      )
  return _REGISTRY[name](config)
