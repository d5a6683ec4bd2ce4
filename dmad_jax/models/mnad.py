"""MNAD (Park et al., CVPR 2020), prediction variant: the memory-guided model DMAD-PDM grew from.

Implementation facts: shared/spec/seed_systems.md Sec. 6. The model predicts the next frame
from ``t_length - 1`` stacked frames:

* an encoder of MNAD ``Basic`` blocks (convolutions *with* bias) and 2x2 max pooling, the
  deepest one ``Basic_`` (linear output): the query features, L2-normalised per pixel;
* a memory of ``memory_size`` unit vectors (10 x 512): every query reads the softmax-weighted
  sum of the items (the weights stop-gradient'ed, as in the released code), concatenated to the
  query (512 -> 1024 channels);
* a decoder with FULL skips (every encoder level but the deepest is concatenated), a ``Gen``
  head and tanh.

The memory items are *state*, not parameters: they live in ``batch_stats["memory"]["items"]``
(checkpointed with the BatchNorm statistics) and are replaced at every training step by the
update of :func:`memory_update` (each item moves towards the queries that chose it, weighted by
their softmax over the queries, then is re-normalised). The loss is the frame MSE plus
``0.1 * compactness`` (queries close to their nearest item) plus ``0.1 * separateness`` (a
triplet loss, margin 1, between the nearest and the second-nearest item).

Test: per frame, the PSNR of the prediction on [0, 1] images and the feature distance (the
compactness of that frame's queries); the ``mnad`` frame recipe min-max normalises both per
video and fuses them as 0.6 / 0.4 (:func:`dmad_jax.evaluation.video.score_frames`). The
released test loop also *updates the memory* with a frame's queries when its point score
(:func:`point_score`) is below 0.01, frame after frame in the test set's order: here that is a
sequential pass (:meth:`MNADDetector.predict_sequential`, carried by the eval job), a pure scan
over the records. ``dmad predict`` and calibration score with the trained memory, unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmad_jax.models import base
from dmad_jax.nn.layers import Basic, Head, Upsample, batch_norm, max_pool2


# ---------------------------------------------------------------------------------------------
# The memory: pure functions of (queries (N, D), items (M, D)).
# ---------------------------------------------------------------------------------------------
def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``torch.nn.functional.normalize``: x / max(||x||_2, eps) along ``axis``."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def memory_scores(query: jax.Array, items: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(softmax over the queries, softmax over the items) of the scores ``query @ items.T``,
  both (N, M): MNAD's ``get_score``."""
  s = query @ items.T
  return jax.nn.softmax(s, axis=0), jax.nn.softmax(s, axis=1)


def memory_read(query: jax.Array, items: jax.Array) -> jax.Array:
  """(N, 2D): each query next to its read, the item average weighted by the softmax over the
  items. The weights are stop-gradient'ed (``.detach()`` in the released code) and the items
  are state, so gradients reach the encoder through the query half only."""
  _, over_items = memory_scores(query, items)
  read = jax.lax.stop_gradient(over_items) @ jax.lax.stop_gradient(items)
  return jnp.concatenate([query, read], axis=-1)


def compactness_loss(query: jax.Array, items: jax.Array) -> jax.Array:
  """Mean squared difference between each query and its nearest item (stop-gradient): the
  training compactness loss and, per frame at test, the feature distance."""
  nearest = jnp.argmax(query @ items.T, axis=1)
  return jnp.mean((query - jax.lax.stop_gradient(items[nearest])) ** 2)


def separateness_loss(
  query: jax.Array, items: jax.Array, margin: float = 1.0, eps: float = 1e-6
) -> jax.Array:
  """``torch.nn.TripletMarginLoss(margin)`` with anchor = query, positive = nearest item,
  negative = second-nearest item (both stop-gradient); torch's distance is ||a - b + eps||_2."""
  _, top2 = jax.lax.top_k(query @ items.T, 2)
  pos = jax.lax.stop_gradient(items[top2[:, 0]])
  neg = jax.lax.stop_gradient(items[top2[:, 1]])

  def dist(a, b):
    return jnp.sqrt(jnp.sum((a - b + eps) ** 2, axis=-1))

  return jnp.mean(jax.nn.relu(dist(query, pos) - dist(query, neg) + margin))


def memory_update(query: jax.Array, items: jax.Array) -> jax.Array:
  """MNAD's ``update``: item m moves by the sum of the queries whose nearest item it is, each
  weighted by its softmax over the queries divided by the largest such weight of item m over
  all queries; then every item is L2-normalised. (M, D); no gradient flows through it."""
  query, items = jax.lax.stop_gradient(query), jax.lax.stop_gradient(items)
  over_queries, _ = memory_scores(query, items)
  nearest = jnp.argmax(query @ items.T, axis=1)
  chosen = jax.nn.one_hot(nearest, items.shape[0], dtype=query.dtype)
  weights = chosen * over_queries / jnp.max(over_queries, axis=0, keepdims=True)
  return l2_normalize(items + weights.T @ query)


def point_score(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """MNAD's ``point_score`` of one frame pair in [-1, 1]: with e the squared error on [0, 1]
  images, sum((1 - exp(-e)) * e) / sum(1 - exp(-e)). Decides the test-time memory update."""
  e = ((prediction + 1) / 2 - (target + 1) / 2) ** 2
  normal = 1 - jnp.exp(-e)
  return jnp.sum(normal * e) / jnp.sum(normal)


def psnr(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """10 log10(1 / MSE) of a frame pair in [-1, 1], measured on [0, 1] images (MNAD's test)."""
  mse = jnp.mean(((prediction + 1) / 2 - (target + 1) / 2) ** 2)
  return 10 * jnp.log10(1 / mse)


def initial_items(rng: jax.Array, size: int, dim: int) -> jax.Array:
  """``F.normalize(torch.rand(size, dim), dim=1)``: uniform draws on the unit sphere's orthant."""
  return l2_normalize(jax.random.uniform(rng, (size, dim)))


# ---------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------
class MNADEncoder(nn.Module):
  """``Basic`` blocks with bias and 2x2 max pooling; the deepest block is ``Basic_``.

  The released encoder also declares a BatchNorm of the deepest width that its forward pass
  never applies; it is declared here too (as ``unused_bn``, in running-average mode so nothing
  updates it), so that the parameter count and the checkpoint layout are the released model's.

  Attributes:
    channels: width per level, shallow to deep (64, 128, 256, 512).
  """

  channels: Sequence[int] = (64, 128, 256, 512)

  @nn.compact
  def __call__(self, x, train):
    feats = []
    for level, c in enumerate(self.channels):
      if level:
        x = max_pool2(x)
      last = level == len(self.channels) - 1
      x = Basic(c, last_linear=last, use_bias=True, name=f"conv{level + 1}")(x, train)
      feats.append(x)
    batch_norm(False, name="unused_bn")(feats[-1])  # declared, output unused (as released)
    return feats[-1], feats[:-1]


class MNADDecoder(nn.Module):
  """``Basic`` on the 2D-channel read, then per level ``Upsample`` (with bias), the encoder
  feature of that level concatenated in front, and ``Basic``; the shallowest level ends in
  ``Gen`` (convolutions with bias) and tanh.

  Attributes:
    channels: encoder widths, shallow to deep.
    out_channels: channels of the predicted frame.
    gen_features: hidden width of the ``Gen`` head (64).
  """

  channels: Sequence[int] = (64, 128, 256, 512)
  out_channels: int = 3
  gen_features: int = 64

  @nn.compact
  def __call__(self, x, skips, train):
    h = Basic(self.channels[-1], use_bias=True, name="conv")(x, train)
    for level in range(len(self.channels) - 1, 0, -1):
      h = Upsample(self.channels[level - 1], use_bias=True, name=f"up{level}")(h, train)
      h = jnp.concatenate([skips[level - 1], h], axis=-1)
      if level > 1:
        h = Basic(self.channels[level - 1], use_bias=True, name=f"deconv{level}")(h, train)
    return Head(self.gen_features, self.out_channels, "tanh", hidden_bias=True, name="gen")(
      h, train
    )


class MNAD(nn.Module):
  """Encoder, memory read, decoder. The memory items are an argument (state kept by the
  detector), not a variable of the module.

  Attributes:
    image_size: input height and width (256 in the released code).
    in_channels: stacked input channels (4 frames x 3 = 12).
    out_channels: channels of the predicted frame (3).
    channels: encoder widths, shallow to deep; the deepest is the memory's dimension.
    gen_features: hidden width of the generator head.
    memory_size: number of memory items (10).
  """

  image_size: int = 256
  in_channels: int = 12
  out_channels: int = 3
  channels: Sequence[int] = (64, 128, 256, 512)
  gen_features: int = 64
  memory_size: int = 10

  def setup(self):
    depth = len(self.channels)
    if self.image_size % (2 ** (depth - 1)):
      raise ValueError(
        f"MNAD: image_size {self.image_size} must be divisible by 2**{depth - 1} "
        f"(one 2x pooling per level of channels={tuple(self.channels)})"
      )
    if self.memory_size < 2:
      raise ValueError(f"MNAD: memory_size must be at least 2 (the separateness loss), got "
                       f"{self.memory_size}")  # fmt: skip
    self.encoder = MNADEncoder(self.channels)
    self.decoder = MNADDecoder(self.channels, self.out_channels, self.gen_features)

  def __call__(self, x, items, *, train: bool) -> dict[str, Any]:
    """Runs the model.

    Args:
      x: (B, H, W, in_channels) stacked past frames in [-1, 1].
      items: (memory_size, channels[-1]) memory items.
      train: BatchNorm mode.

    Returns:
      ``prediction`` (B, H, W, out_channels) in [-1, 1]; ``query`` (B * h * w, D) the
      normalised query of every deepest-level pixel, batch-major.
    """
    if x.shape[1:] != (self.image_size, self.image_size, self.in_channels):
      raise ValueError(
        f"MNAD: expected inputs of {self.image_size}x{self.image_size}x{self.in_channels}, "
        f"got {x.shape}"
      )
    z, skips = self.encoder(x, train)
    b, h, w, d = z.shape
    query = l2_normalize(z).reshape(b * h * w, d)
    read = memory_read(query, items).reshape(b, h, w, 2 * d)
    return dict(prediction=self.decoder(read, skips, train), query=query)


# ---------------------------------------------------------------------------------------------
# The detector.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MNADLoss:
  """Weights of MNAD's training loss (released defaults).

  Attributes:
    compactness: weight of :func:`compactness_loss` (0.1).
    separateness: weight of :func:`separateness_loss` (0.1).
    margin: the triplet margin (1.0).
  """

  compactness: float = 0.1
  separateness: float = 0.1
  margin: float = 1.0


SCORE_DEFAULTS = {"update_threshold": 0.01, "test_update": True}
MEMORY = "memory"  # the batch_stats key of the memory items


@base.register("mnad")
class MNADDetector(base.Detector):
  """MNAD on the video sources' clips: ``batch["frames"]`` stacks ``t_length`` frames on the
  channel axis, oldest first; the first ``t_length - 1`` are the input, the last the target.

  Config: ``model`` (:class:`MNAD` attributes), ``loss`` (:class:`MNADLoss`), ``score``
  (``update_threshold``: the point score below which a test frame updates the memory, 0.01;
  ``test_update``: whether the eval job's pass updates it at all), ``t_length``.

  Scores: ``score`` = -PSNR (higher = more anomalous) and ``feature_distance``; their frame
  errors (``mnad_neg_psnr``, ``mnad_feature_distance``) feed the ``mnad`` frame recipe.
  """

  config_sections = {"model": MNAD, "loss": MNADLoss, "score": SCORE_DEFAULTS}
  config_keys = ("t_length",)
  figure_rows = ("input", "prediction")
  score_names = ("score", "feature_distance")

  def __init__(self, config):
    super().__init__(config)
    self.module = MNAD(**self.section("model"))
    self.weights = MNADLoss(**self.section("loss"))
    score = self.section("score")
    self.threshold = float(score["update_threshold"])
    self.test_update = bool(score["test_update"])
    self.t_length = int(config.get("t_length", 5))
    if self.t_length < 2:
      raise ValueError(f"mnad predicts the next frame: t_length must be >= 2, got {self.t_length}")

  def split(self, batch):
    """(stacked input frames, target frame) of a batch."""
    frames = batch["frames"]
    c = self.module.out_channels
    return frames[..., :-c], frames[..., -c:]

  @staticmethod
  def _bn(batch_stats):
    return {k: v for k, v in batch_stats.items() if k != MEMORY}

  def init(self, rng, batch):
    """``{"params", "batch_stats"}``; ``batch_stats["memory"]["items"]`` are the memory items."""
    x, _ = self.split(batch)
    net_rng, mem_rng = jax.random.split(rng)
    items = initial_items(mem_rng, self.module.memory_size, self.module.channels[-1])
    variables = self.module.init(net_rng, x, items, train=False)
    stats = dict(variables.get("batch_stats", {}))
    stats[MEMORY] = {"items": items}
    return {"params": variables["params"], "batch_stats": stats}

  def loss(self, params, batch_stats, batch, rng):
    """MSE + 0.1 compactness + 0.1 separateness; the new state holds the updated memory."""
    del rng
    x, target = self.split(batch)
    items = batch_stats[MEMORY]["items"]
    out, updates = self.apply(
      self.module,
      {"params": params, "batch_stats": self._bn(batch_stats)},
      x,
      items,
      train=True,
      mutable=["batch_stats"],
    )
    query = out["query"]
    terms = {
      "mse": jnp.mean((out["prediction"] - target) ** 2),
      "compactness": compactness_loss(query, items),
      "separateness": separateness_loss(query, items, self.weights.margin),
    }
    total = (
      terms["mse"]
      + self.weights.compactness * terms["compactness"]
      + self.weights.separateness * terms["separateness"]
    )
    stats = dict(updates["batch_stats"])
    stats[MEMORY] = {"items": memory_update(query, items)}
    return total, (terms, stats)

  # -- scoring -------------------------------------------------------------------------------
  def _frame(self, variables, items, x, target):
    """Eval-mode outputs of one batch with memory ``items``: (prediction, query per record
    (B, h * w, D), -PSNR (B,), feature distance (B,), point score (B,))."""
    out = self.apply(
      self.module,
      {"params": variables["params"], "batch_stats": self._bn(variables["batch_stats"])},
      x,
      items,
      train=False,
    )
    pred = out["prediction"]
    query = out["query"].reshape(x.shape[0], -1, out["query"].shape[-1])
    neg_psnr = -jax.vmap(psnr)(pred, target)
    dist = jax.vmap(compactness_loss, in_axes=(0, None))(query, items)
    point = jax.vmap(point_score)(pred, target)
    return pred, query, neg_psnr, dist, point

  def _prediction(self, target, pred, neg_psnr, dist) -> base.Prediction:
    return base.Prediction(
      scores={"score": neg_psnr, "feature_distance": dist},
      images={"input": target, "prediction": pred},
      frame_errors={"mnad_neg_psnr": neg_psnr, "mnad_feature_distance": dist},
    )

  def predict(self, variables, batch) -> base.Prediction:
    """Scores of a batch with the trained memory (no test-time update)."""
    x, target = self.split(batch)
    pred, _, neg_psnr, dist, _ = self._frame(variables, variables["batch_stats"][MEMORY]["items"],
                                             x, target)  # fmt: skip
    return self._prediction(target, pred, neg_psnr, dist)

  def predict_state(self, variables):
    """The memory the eval job's pass over the test split starts from: the trained one."""
    return variables["batch_stats"][MEMORY]["items"]

  def predict_sequential(self, variables, items, batch, real):
    """Scores record after record, as the released test loop: each record is scored with the
    memory left by the records before it, then updates it with its queries when its point
    score is below ``score.update_threshold`` (and ``score.test_update``). Padding records
    (``real`` False) leave the memory unchanged.

    Returns:
      (Prediction, the memory after the batch).
    """
    x, target = self.split(batch)

    def one(items, record):
      xi, ti, keep = record
      pred, query, neg_psnr, dist, point = self._frame(variables, items, xi[None], ti[None])
      update = jnp.logical_and(keep, point[0] < self.threshold) & self.test_update
      items = jnp.where(update, memory_update(query[0], items), items)
      return items, (pred[0], neg_psnr[0], dist[0])

    items, (pred, neg_psnr, dist) = jax.lax.scan(one, items, (x, target, real))
    return self._prediction(target, pred, neg_psnr, dist), items
