"""Tests for the linen VectorQuantizer wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmad_jax.nn.quantize import VectorQuantizer
from dmad_jax.ops import quantize as vq


def test_init_creates_a_uniform_codebook():
  module = VectorQuantizer(num_codes=20, dim=6)
  z = jnp.zeros((2, 4, 4, 6))
  params = module.init(jax.random.key(0), z)
  assert jax.tree.map(jnp.shape, params) == {"params": {"codebook": (20, 6)}}
  # U(-1/K, 1/K): bounded by 1/K and, with 120 draws, reaching close to the bound.
  max_abs = float(jnp.max(jnp.abs(params["params"]["codebook"])))
  assert 0.8 / 20 < max_abs <= 1 / 20


def test_apply_equals_the_op_with_the_same_params():
  module = VectorQuantizer(num_codes=8, dim=3, beta=0.5, chunk_size=5)
  z = jax.random.normal(jax.random.key(1), (2, 3, 4, 3))
  params = module.init(jax.random.key(0), z)
  z_q_st, aux = jax.jit(module.apply)(params, z)
  z_q_ref, aux_ref = vq.vector_quantize(z, params["params"]["codebook"], beta=0.5)
  assert z_q_st.shape == z.shape and aux.indices.shape == (2, 3, 4)
  np.testing.assert_allclose(z_q_st, z_q_ref, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), aux, aux_ref)


def test_wrong_width_raises():
  module = VectorQuantizer(num_codes=8, dim=3)
  with pytest.raises(ValueError, match="D=3"):
    module.init(jax.random.key(0), jnp.zeros((2, 5)))


def test_ema_codebook_starts_on_the_data_and_learns_without_a_parameter():
  module = VectorQuantizer(num_codes=4, dim=2, update="ema", decay=0.5, dead_threshold=0.3)
  z = jnp.asarray([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]] * 4)
  variables = module.init(jax.random.key(0), z)
  assert "params" not in variables  # nothing for the optimizer
  # Inference (train=False) and a frozen collection leave the codebook as it is.
  _, aux = module.apply(variables, z)
  assert set(variables["batch_stats"]) == {"cluster_size", "embed_sum"}
  stats = variables["batch_stats"]
  for _ in range(12):
    (_, aux), upd = module.apply({"batch_stats": stats}, z, True, mutable=["batch_stats"])
    stats = upd["batch_stats"]
  # Codes that restarted on the same point fall out of use and restart elsewhere until every
  # code sits on one of the four clusters: all in use.
  _, aux = module.apply({"batch_stats": stats}, z)
  assert float(aux.perplexity) == pytest.approx(4.0, rel=1e-5)
  np.testing.assert_allclose(aux.quantized, z, atol=0.05)  # the average closes in at decay^t
  with pytest.raises(ValueError, match="update must be one of"):
    VectorQuantizer(num_codes=4, dim=2, update="kmeans").init(jax.random.key(0), z)


@pytest.mark.parametrize("update", ["loss", "ema"])
def test_rank_returns_the_next_nearest_codes_without_gradient(update):
  module = VectorQuantizer(num_codes=5, dim=3, update=update)
  z = jax.random.normal(jax.random.key(1), (4, 1, 1, 3))
  variables = module.init(jax.random.key(0), z)
  if update == "ema":  # a codebook with distinct, used codes
    book = jax.random.normal(jax.random.key(2), (5, 3))
    variables = {"batch_stats": {"cluster_size": jnp.ones((5,)), "embed_sum": book}}
  else:
    book = variables["params"]["codebook"]
  for rank in range(5):
    q, aux = module.apply(variables, z, rank=rank)
    index = vq.ranked_code_indices(z.reshape(-1, 3), book, rank)
    np.testing.assert_array_equal(aux.indices.reshape(-1), index)
    np.testing.assert_allclose(q.reshape(-1, 3), book[index], rtol=1e-6)
  # A traced rank (the index of a loop over ranks) selects the same codes.
  traced = jax.jit(lambda r: module.apply(variables, z, rank=r)[1].indices)
  np.testing.assert_array_equal(
    traced(jnp.int32(3)).reshape(-1), vq.ranked_code_indices(z.reshape(-1, 3), book, 3)
  )
  grad = jax.grad(lambda z: jnp.sum(module.apply(variables, z, rank=2)[0]))(z)
  assert not np.any(np.asarray(grad))
  with pytest.raises(ValueError, match="rank 1 is for inference"):
    module.apply(variables, z, True, rank=1, mutable=["batch_stats"])
