"""MNAD: the released model's size, the memory against direct NumPy computations, the loss and
the test-time memory update of the eval job's sequential pass."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmad_jax.configs import load_module
from dmad_jax.models import get_detector, mnad

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(arg="root=/d;runlocal"):
  return load_module(os.path.join(ROOT, "configs", "ped2_mnad.py")).get_config(arg)


def _size(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_ped2_model_has_the_released_parameter_count():
  """15,651,843 parameters (encoder 4,694,400 with the BatchNorm the released encoder declares
  but never applies; decoder 10,957,443), computed from the released model code; the 10 x 512
  memory items are state, not parameters."""
  detector = get_detector(_config("root=/d"))
  batch = {"frames": jax.ShapeDtypeStruct((1, 256, 256, 15), jnp.float32)}
  v = jax.eval_shape(detector.init, jax.random.PRNGKey(0), batch)
  assert _size(v["params"]) == 15_651_843
  assert _size(v["params"]["encoder"]) == 4_694_400
  assert _size(v["params"]["decoder"]) == 10_957_443
  assert set(v["params"]) == {"encoder", "decoder"}
  assert v["batch_stats"]["memory"]["items"].shape == (10, 512)


# -- NumPy references, written from the released code's loops ----------------------------------
def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_softmax(s, axis):
  e = np.exp(s - s.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _np_update(query, items):
  """MNAD's get_update_query + F.normalize, item by item."""
  s = query @ items.T
  over_queries = _np_softmax(s, 0)
  nearest = np.argmax(s, axis=1)
  update = np.zeros_like(items)
  for i in range(items.shape[0]):
    idx = np.nonzero(nearest == i)[0]
    if len(idx):
      w = over_queries[idx, i] / over_queries[:, i].max()
      update[i] = (w[:, None] * query[idx]).sum(0)
  return _np_normalize(items + update)


def _np_triplet(query, items, margin=1.0, eps=1e-6):
  s = query @ items.T
  order = np.argsort(-s, axis=1)
  pos, neg = items[order[:, 0]], items[order[:, 1]]
  d = lambda a, b: np.sqrt(((a - b + eps) ** 2).sum(-1))  # noqa: E731
  return np.maximum(d(query, pos) - d(query, neg) + margin, 0).mean()


def _np_point_score(pred, target):
  e = ((pred + 1) / 2 - (target + 1) / 2) ** 2
  normal = 1 - np.exp(-e)
  return (normal * e).sum() / normal.sum()


@pytest.fixture
def memory_case():
  rng = np.random.default_rng(0)
  query = _np_normalize(rng.normal(size=(37, 16))).astype(np.float64)
  items = _np_normalize(rng.uniform(size=(6, 16))).astype(np.float64)
  return query, items


def test_memory_read_compactness_separateness_and_update_match_numpy(memory_case):
  query, items = memory_case
  q, m = jnp.asarray(query, jnp.float32), jnp.asarray(items, jnp.float32)
  read = np.asarray(mnad.memory_read(q, m))
  want = np.concatenate([query, _np_softmax(query @ items.T, 1) @ items], axis=1)
  np.testing.assert_allclose(read, want, rtol=1e-5, atol=1e-6)
  nearest = items[np.argmax(query @ items.T, axis=1)]
  np.testing.assert_allclose(
    mnad.compactness_loss(q, m), ((query - nearest) ** 2).mean(), rtol=1e-5
  )
  np.testing.assert_allclose(mnad.separateness_loss(q, m), _np_triplet(query, items), rtol=1e-5)
  np.testing.assert_allclose(
    mnad.memory_update(q, m), _np_update(query, items), rtol=1e-5, atol=1e-6
  )
  # The update is a real move: every item that some query chose changes; the others do not.
  chosen = np.unique(np.argmax(query @ items.T, axis=1))
  moved = np.abs(np.asarray(mnad.memory_update(q, m)) - items).max(axis=1) > 1e-4
  assert moved.tolist() == [i in chosen for i in range(len(items))]


def test_gradients_reach_the_encoder_through_the_query_half_only(memory_case):
  """The read's weights are stop-gradient'ed and the items are state: the read half of the
  decoder input has no gradient with respect to the query."""
  query, items = memory_case
  q, m = jnp.asarray(query, jnp.float32), jnp.asarray(items, jnp.float32)
  d = q.shape[1]
  g_read = jax.grad(lambda q: mnad.memory_read(q, m)[:, d:].sum())(q)
  g_query = jax.grad(lambda q: mnad.memory_read(q, m)[:, :d].sum())(q)
  assert float(jnp.abs(g_read).max()) == 0.0
  np.testing.assert_array_equal(g_query, np.ones_like(query))
  assert float(jnp.abs(jax.grad(lambda m: mnad.memory_update(q, m).sum())(m)).max()) == 0.0


def _batch(detector, n=6, seed=0):
  rng = np.random.default_rng(seed)
  size = detector.module.image_size
  return {"frames": jnp.asarray(rng.uniform(-1, 1, (n, size, size, 15)), jnp.float32)}


def test_loss_terms_and_the_trained_memory_match_direct_computation():
  detector = get_detector(_config())
  batch = _batch(detector)
  variables = detector.init(jax.random.PRNGKey(0), batch)
  items = variables["batch_stats"]["memory"]["items"]
  np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-6)
  loss, (terms, stats) = detector.loss(
    variables["params"], variables["batch_stats"], batch, jax.random.PRNGKey(1)
  )
  bn = {k: v for k, v in variables["batch_stats"].items() if k != "memory"}
  x, target = detector.split(batch)
  out, _ = detector.module.apply(
    {"params": variables["params"], "batch_stats": bn}, x, items, train=True,
    mutable=["batch_stats"],
  )  # fmt: skip
  query, it = np.asarray(out["query"], np.float64), np.asarray(items, np.float64)
  nearest = it[np.argmax(query @ it.T, axis=1)]
  np.testing.assert_allclose(terms["mse"], np.mean((out["prediction"] - target) ** 2), rtol=1e-5)
  np.testing.assert_allclose(terms["compactness"], ((query - nearest) ** 2).mean(), rtol=1e-4)
  np.testing.assert_allclose(terms["separateness"], _np_triplet(query, it), rtol=1e-4)
  np.testing.assert_allclose(
    loss, terms["mse"] + 0.1 * terms["compactness"] + 0.1 * terms["separateness"], rtol=1e-6
  )
  np.testing.assert_allclose(stats["memory"]["items"], _np_update(query, it), atol=1e-5)
  assert set(stats) == set(variables["batch_stats"])  # BatchNorm statistics kept alongside


def test_sequential_predict_is_the_released_test_loop():
  """Record after record: scores with the memory so far, then the update when the point score
  is below the threshold (here 1e9: every real record updates; with ``score.test_update=False``
  none does); padding records change nothing."""
  threshold = 1e9
  config = _config()
  config.score.update_threshold = threshold
  detector = get_detector(config)
  batch = _batch(detector, n=5, seed=1)
  variables = detector.init(jax.random.PRNGKey(0), batch)
  items0 = detector.predict_state(variables)
  real = jnp.asarray([True, True, True, True, False])
  pred, items = jax.jit(detector.predict_sequential)(variables, items0, batch, real)

  # The loop, one record at a time with the NumPy update.
  x, target = detector.split(batch)
  bn = {k: v for k, v in variables["batch_stats"].items() if k != "memory"}
  m = np.asarray(items0, np.float64)
  updates = 0
  for i in range(5):
    out = detector.module.apply(
      {"params": variables["params"], "batch_stats": bn}, x[i : i + 1],
      jnp.asarray(m, jnp.float32), train=False,
    )  # fmt: skip
    p, t = np.asarray(out["prediction"][0], np.float64), np.asarray(target[i], np.float64)
    query = np.asarray(out["query"], np.float64)
    mse = np.mean(((p + 1) / 2 - (t + 1) / 2) ** 2)
    np.testing.assert_allclose(pred.scores["score"][i], -10 * np.log10(1 / mse), rtol=1e-5)
    nearest = m[np.argmax(query @ m.T, axis=1)]
    np.testing.assert_allclose(
      pred.scores["feature_distance"][i], ((query - nearest) ** 2).mean(), rtol=1e-4
    )
    if bool(real[i]) and _np_point_score(p, t) < threshold:
      m = _np_update(query, m)
      updates += 1
  assert updates == 4
  np.testing.assert_allclose(items, m, atol=1e-5)
  np.testing.assert_array_equal(pred.frame_errors["mnad_neg_psnr"], pred.scores["score"])

  # score.test_update=False scores with the trained memory throughout.
  config.score.test_update = False
  fixed = get_detector(config)
  _, same = jax.jit(fixed.predict_sequential)(variables, items0, batch, real)
  np.testing.assert_array_equal(same, items0)
