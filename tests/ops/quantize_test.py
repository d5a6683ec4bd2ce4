"""Tests for dmad_jax.ops.quantize: VQ assignment, straight-through, losses, re-seeding."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given

from dmad_jax.ops import quantize as vq

# Shapes are drawn from small sets and the op is jitted once at module level, so hypothesis
# examples mostly hit the compilation cache (each new shape costs one XLA compile).
# (leading shape, D, K): NHWC-like and flat rows, a single code, D = 1, more codes than rows.
_SHAPES = [((2, 3, 3), 3, 5), ((7,), 1, 8), ((1, 4, 5), 2, 1), ((3,), 3, 8), ((2, 2, 4), 2, 5)]
_vq = jax.jit(vq.vector_quantize, static_argnames=("beta", "chunk_size"))


@st.composite
def vq_problems(draw, dyadic=False):
  """Draws ``(z, codebook)`` numpy float32 arrays.

  With ``dyadic`` the entries are multiples of 1/2 in [-2, 2]: every distance is then exact in
  float32, so the matmul form and the brute-force form agree bit for bit (ties included).
  """
  lead, dim, num_codes = draw(st.sampled_from(_SHAPES))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  if dyadic:
    z = rng.integers(-4, 5, size=(*lead, dim)) / 2
    codebook = rng.integers(-4, 5, size=(num_codes, dim)) / 2
  else:
    z = rng.normal(size=(*lead, dim))
    codebook = rng.normal(size=(num_codes, dim))
  return z.astype(np.float32), codebook.astype(np.float32)


def _np_distances(z, codebook):
  """Brute-force squared L2 distances ``(N, K)`` of the flattened rows, in float64."""
  flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
  return np.sum((flat[:, None, :] - codebook[None].astype(np.float64)) ** 2, axis=-1)


@given(vq_problems(dyadic=True))
def test_outputs_are_nearest_codebook_rows_exact(problem):
  z, codebook = problem
  z_q_st, aux = _vq(jnp.asarray(z), jnp.asarray(codebook))
  expected = np.argmin(_np_distances(z, codebook), axis=-1).reshape(z.shape[:-1])
  assert aux.indices.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(aux.indices), expected)
  np.testing.assert_allclose(np.asarray(z_q_st), codebook[expected], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux.quantized), codebook[expected])


@given(vq_problems())
def test_outputs_are_nearest_codebook_rows_float(problem):
  z, codebook = problem
  z_q_st, aux = _vq(jnp.asarray(z), jnp.asarray(codebook))
  dist = _np_distances(z, codebook)
  idx = np.asarray(aux.indices).reshape(-1)
  # Random floats may produce near-ties that float32 rounding resolves either way; the chosen
  # code must then still be nearest up to rounding, and is the exact argmin otherwise.
  chosen = dist[np.arange(dist.shape[0]), idx]
  np.testing.assert_allclose(chosen, dist.min(axis=-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(z_q_st), codebook[aux.indices], atol=1e-5)


@given(vq_problems())
def test_straight_through_jacobian_is_identity(problem):
  z, codebook = problem
  jac = jax.jit(jax.jacobian(lambda x, cb: vq.vector_quantize(x, cb)[0]))(
    jnp.asarray(z), jnp.asarray(codebook)
  )
  np.testing.assert_array_equal(np.asarray(jac).reshape(z.size, z.size), np.eye(z.size))


@given(
  st.tuples(
    st.sampled_from([(7, 2), (7, 3), (7, 5), (12, 5), (12, 7), (23, 4), (23, 10)]),
    st.integers(0, 2**31 - 1),
  ),
  st.booleans(),
)
def test_chunked_equals_unchunked(rows_chunk_seed, dyadic):
  (rows, chunk), seed = rows_chunk_seed
  assert rows % chunk != 0  # the last chunk is padded
  rng = np.random.default_rng(seed)
  if dyadic:
    z = rng.integers(-4, 5, size=(rows, 3)) / 2
    codebook = rng.integers(-4, 5, size=(6, 3)) / 2
  else:
    z = rng.normal(size=(rows, 3))
    codebook = rng.normal(size=(6, 3))
  z, codebook = jnp.asarray(z, jnp.float32), jnp.asarray(codebook, jnp.float32)
  out_chunked = _vq(z, codebook, chunk_size=chunk)
  out_whole = _vq(z, codebook, chunk_size=rows)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
    out_chunked,
    out_whole,
  )


@given(vq_problems(), st.sampled_from([0.25, 1.0, 0.1]))
def test_losses_usage_and_perplexity_match_numpy(problem, beta):
  z, codebook = problem
  _, aux = _vq(jnp.asarray(z), jnp.asarray(codebook), beta=beta)
  idx = np.asarray(aux.indices).reshape(-1)
  q = codebook[idx].reshape(z.shape).astype(np.float64)
  mse = np.mean((q - z) ** 2)
  np.testing.assert_allclose(float(aux.codebook_loss), mse, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(aux.commitment_loss), beta * mse, rtol=1e-5, atol=1e-7)

  usage = np.bincount(idx, minlength=codebook.shape[0]).astype(np.float64)
  np.testing.assert_array_equal(np.asarray(aux.usage), usage)
  assert aux.usage.dtype == jnp.float32
  p = usage / idx.size
  p = p[p > 0]
  np.testing.assert_allclose(float(aux.perplexity), np.exp(-np.sum(p * np.log(p))), rtol=1e-5)


def _losses(x, cb, beta):
  aux = vq.vector_quantize(x, cb, beta=beta)[1]
  return aux.codebook_loss, aux.commitment_loss


_loss_jacobians = jax.jit(jax.jacrev(_losses, argnums=(0, 1)), static_argnums=2)


@given(vq_problems(), st.sampled_from([0.25, 0.5]))
def test_gradients_flow_only_where_intended(problem, beta):
  z, codebook = problem
  z_j, cb_j = jnp.asarray(z), jnp.asarray(codebook)
  (g_cl_z, g_cl_cb), (g_cm_z, g_cm_cb) = _loss_jacobians(z_j, cb_j, beta)
  idx = np.asarray(_vq(z_j, cb_j)[1].indices).reshape(-1)
  flat = z.reshape(-1, z.shape[-1])
  diff = codebook[idx] - flat  # q - z per row
  expected_cb = np.zeros_like(codebook)
  np.add.at(expected_cb, idx, 2.0 * diff / z.size)

  # codebook_loss = mean((q - sg(z))^2): trains the codebook only.
  np.testing.assert_array_equal(np.asarray(g_cl_z), 0.0)
  np.testing.assert_allclose(np.asarray(g_cl_cb), expected_cb, rtol=1e-5, atol=1e-6)
  # commitment_loss = beta * mean((sg(q) - z)^2): trains z only.
  np.testing.assert_array_equal(np.asarray(g_cm_cb), 0.0)
  np.testing.assert_allclose(
    np.asarray(g_cm_z).reshape(flat.shape), -2.0 * beta * diff / z.size, rtol=1e-5, atol=1e-6
  )


def _torch_official_vq(z, embedding, beta=0.25):
  """Tiny re-implementation of the official DMAD VQ forward (spec section 0) in torch."""
  flat = z.reshape(-1, z.shape[-1])
  dist = (
    torch.sum(flat**2, dim=1, keepdim=True)
    + torch.sum(embedding**2, dim=1)
    - 2 * torch.matmul(flat, embedding.t())
  )
  indices = torch.argmin(dist, dim=1)
  q = embedding[indices].view(z.shape)
  commitment = torch.nn.functional.mse_loss(q.detach(), z)
  embedding_loss = torch.nn.functional.mse_loss(q, z.detach())
  q_st = z + (q - z).detach()
  return q_st, indices.view(z.shape[:-1]), beta * commitment, embedding_loss


def test_parity_with_torch_official_vq():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 5, 5, 8)).astype(np.float32)
  codebook = rng.uniform(-1, 1, size=(16, 8)).astype(np.float32) * 2
  upstream = rng.normal(size=z.shape).astype(np.float32)

  z_t = torch.tensor(z, requires_grad=True)
  cb_t = torch.tensor(codebook, requires_grad=True)
  q_st_t, idx_t, commit_t, emb_t = _torch_official_vq(z_t, cb_t)
  # PPDM's total: 0.25 * commitment + embedding, plus a downstream term through q_st.
  (commit_t + emb_t + torch.sum(q_st_t * torch.tensor(upstream))).backward()

  def total(x, cb):
    q_st, aux = vq.vector_quantize(x, cb)
    return aux.commitment_loss + aux.codebook_loss + jnp.sum(q_st * upstream), (q_st, aux)

  (_, (q_st, aux)), (g_z, g_cb) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
    jnp.asarray(z), jnp.asarray(codebook)
  )
  np.testing.assert_array_equal(np.asarray(aux.indices), idx_t.numpy())
  np.testing.assert_allclose(np.asarray(q_st), q_st_t.detach().numpy(), atol=1e-5)
  np.testing.assert_allclose(float(aux.commitment_loss), commit_t.item(), atol=1e-5)
  np.testing.assert_allclose(float(aux.codebook_loss), emb_t.item(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_z), z_t.grad.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_cb), cb_t.grad.numpy(), atol=1e-5)


@pytest.mark.parametrize("num_rows", [12, 4])  # at least K rows (no replacement) and fewer
def test_reseed_replaces_exactly_the_dead_codes(num_rows):
  rng = np.random.default_rng(2)
  codebook = rng.normal(size=(6, 3)).astype(np.float32)
  z = (rng.normal(size=(num_rows, 3)) + 100.0).astype(np.float32)  # rows far from all codes
  usage = jnp.array([0.0, 3.0, 0.5, 2.0, 1.0, 0.0])
  dead = np.asarray(usage) < 1.0
  new, count = jax.jit(vq.reseed_dead_codes)(
    jnp.asarray(codebook), usage, jnp.asarray(z).reshape(2, -1, 3), jax.random.key(0)
  )
  new = np.asarray(new)
  assert int(count) == dead.sum() == 3
  np.testing.assert_array_equal(new[~dead], codebook[~dead])
  for row in new[dead]:
    assert np.any(np.all(row == z, axis=-1)), "a re-seeded code must be a row of z"
  if num_rows >= codebook.shape[0]:
    assert len({tuple(r) for r in new[dead]}) == dead.sum()


def test_uniform_codebook_init_range():
  cb = vq.uniform_codebook_init(jax.random.key(0), 50, 64)
  assert cb.shape == (50, 64) and cb.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(cb))) <= 1 / 50
  assert float(jnp.std(cb)) > 0.5 / 50 / np.sqrt(3)  # genuinely spread, not constant


def test_shape_errors():
  with pytest.raises(ValueError, match="D=4"):
    vq.vector_quantize(jnp.zeros((2, 3)), jnp.zeros((5, 4)))
  with pytest.raises(ValueError, match="chunk_size"):
    vq.vector_quantize(jnp.zeros((2, 4)), jnp.zeros((5, 4)), chunk_size=0)


def test_jit_vmap_grad_compile_once():
  rng = np.random.default_rng(3)
  codebook = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(z, cb, key):
    def loss(x, c):
      z_q_st, aux = vq.vector_quantize(x, c, chunk_size=7)
      return jnp.sum(z_q_st**2) + aux.codebook_loss + aux.commitment_loss, aux

    (grads, aux) = jax.grad(loss, argnums=(0, 1), has_aux=True)(z, cb)
    per_example = jax.vmap(lambda x: vq.vector_quantize(x, cb, chunk_size=7)[1])(z)
    reseeded = vq.reseed_dead_codes(cb, aux.usage, z, key)
    return grads, aux, per_example, reseeded

  for seed in range(3):
    z = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    _, aux, per_example, _ = step(z, codebook, jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(per_example.indices), np.asarray(aux.indices))
    for i in range(3):
      single = vq.vector_quantize(z[i], codebook)[1]
      np.testing.assert_allclose(per_example.codebook_loss[i], single.codebook_loss, rtol=1e-6)
      np.testing.assert_array_equal(per_example.usage[i], single.usage)


def test_ema_codebook_update_is_the_moving_average_and_restarts_dead_codes():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 2)).astype(np.float32)
  cluster = np.array([2.0, 1.0, 0.05, 0.5], np.float32)
  embed = rng.normal(size=(4, 2)).astype(np.float32)
  idx = np.array([0, 0, 1, 1, 1, 3])
  new_c, new_e, restarted = vq.ema_codebook_update(
    jnp.asarray(cluster), jnp.asarray(embed), jnp.asarray(z), jnp.asarray(idx),
    decay=0.9, dead_threshold=0.1,
  )  # fmt: skip
  counts = np.bincount(idx, minlength=4)
  sums = np.stack([z[idx == k].sum(0) for k in range(4)])
  want_c = 0.9 * cluster + 0.1 * counts
  want_e = 0.9 * embed + 0.1 * sums
  alive = np.array([True, True, False, True])  # code 2: 0.045 < 0.1, unused, restarts
  np.testing.assert_allclose(np.asarray(new_c)[alive], want_c[alive], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new_e)[alive], want_e[alive], rtol=1e-6)
  assert int(restarted) == 1 and float(new_c[2]) == 1.0
  # It restarts at the row worst quantised by the updated codes.
  codes = want_e / want_c[:, None]
  worst = np.argmax(np.sum((z - codes[idx]) ** 2, -1))
  np.testing.assert_allclose(np.asarray(new_e)[2], z[worst], rtol=1e-6)


def test_ranked_code_indices_follow_the_sorted_distances():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(9, 4)).astype(np.float32)
  codebook = rng.normal(size=(6, 4)).astype(np.float32)
  order = np.argsort(((z[:, None] - codebook[None]) ** 2).sum(-1), axis=1, kind="stable")
  for rank in range(6):
    np.testing.assert_array_equal(vq.ranked_code_indices(z, codebook, rank), order[:, rank])
  np.testing.assert_array_equal(
    vq.ranked_code_indices(z, codebook, 0), vq.nearest_code_indices(z, codebook)
  )
  # Equal distances go to the lower index, as argmin's do.
  tied = np.asarray([[1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]], np.float32)
  np.testing.assert_array_equal(vq.ranked_code_indices(np.zeros((1, 2)), tied, 1), [1])
  with pytest.raises(ValueError, match=r"rank must be in \[0, 6\)"):
    vq.ranked_code_indices(z, codebook, 6)
