"""Tests for dmad_jax.ops.memory: DAAD block-wise memory read with MemAE hard shrinkage."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from dmad_jax.ops import memory as mem

# (batch, rates, block shape (H/r_h, W/r_w, C/r_c), N). Drawn from a fixed list so hypothesis
# examples reuse compiled kernels; covers a per-pixel read (block 1x1xC), an image-level read
# (rates (1, 1, 1)), channel splitting (r_c > 1) and non-square grids.
_CASES = [
  (2, (2, 2, 1), (2, 2, 3), 5),
  (1, (3, 2, 2), (1, 2, 2), 7),
  (2, (4, 3, 1), (1, 1, 4), 6),
  (1, (1, 1, 1), (3, 2, 2), 4),
  (2, (2, 1, 3), (2, 3, 1), 2),
]
_read = jax.jit(
  mem.block_memory_read, static_argnames=("rates", "shrink", "shrink_threshold", "eps")
)


@st.composite
def memory_problems(draw):
  """Draws ``(f, memory, rates)`` with f (B, H, W, C) and memory (N, D) as float32 numpy."""
  batch, rates, block, num_items = draw(st.sampled_from(_CASES))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  shape = (batch, *(r * b for r, b in zip(rates, block, strict=True)))
  f = rng.normal(size=shape).astype(np.float32)
  memory = rng.normal(size=(num_items, int(np.prod(block)))).astype(np.float32)
  return f, memory, rates


def _np_blocks(f, rates):
  """``(B, r_h, r_w, r_c, D)`` queries by explicit slicing, each block flattened (h, w, c)."""
  b, h, w, c = f.shape
  r_h, r_w, r_c = rates
  bh, bw, bc = h // r_h, w // r_w, c // r_c
  out = np.zeros((b, r_h, r_w, r_c, bh * bw * bc), f.dtype)
  for n in range(b):
    for i in range(r_h):
      for j in range(r_w):
        for k in range(r_c):
          block = f[n, i * bh : (i + 1) * bh, j * bw : (j + 1) * bw, k * bc : (k + 1) * bc]
          out[n, i, j, k] = block.reshape(-1)  # C order = (h, w, c) row-major
  return out


def _np_assemble(blocks, shape, rates):
  """Inverse of :func:`_np_blocks`."""
  b, h, w, c = shape
  r_h, r_w, r_c = rates
  bh, bw, bc = h // r_h, w // r_w, c // r_c
  out = np.zeros(shape, blocks.dtype)
  for n in range(b):
    for i in range(r_h):
      for j in range(r_w):
        for k in range(r_c):
          block = blocks[n, i, j, k].reshape(bh, bw, bc)
          out[n, i * bh : (i + 1) * bh, j * bw : (j + 1) * bw, k * bc : (k + 1) * bc] = block
  return out


def _np_softmax_cos(queries, memory):
  """Softmax over items of the cosine similarity, float64."""
  q = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
  m = memory / np.linalg.norm(memory, axis=-1, keepdims=True)
  cos = np.einsum("...d,nd->...n", q.astype(np.float64), m.astype(np.float64))
  e = np.exp(cos - cos.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


@given(memory_problems())
def test_weights_without_shrink_pin_the_flatten_order(problem):
  f, memory, rates = problem
  read, weights = _read(jnp.asarray(f), jnp.asarray(memory), rates=rates, shrink=False)
  expected = _np_softmax_cos(_np_blocks(f, rates), memory)
  assert weights.shape == (f.shape[0], *rates, memory.shape[0])
  np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(read), _np_assemble(expected @ memory, f.shape, rates), rtol=1e-5, atol=1e-5
  )


@given(memory_problems(), st.sampled_from([None, 0.05]))
def test_shrunk_weights_are_a_sparse_distribution(problem, threshold):
  f, memory, rates = problem
  f_j, m_j = jnp.asarray(f), jnp.asarray(memory)
  lam = 1.0 / memory.shape[0] if threshold is None else threshold
  dense = np.asarray(_read(f_j, m_j, rates=rates, shrink=False)[1])
  read, weights = _read(f_j, m_j, rates=rates, shrink_threshold=threshold)
  weights = np.asarray(weights)
  assert np.all(weights >= 0)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  # Exactly the weights at or below the threshold are dropped ...
  np.testing.assert_array_equal(weights == 0, dense <= lam)
  # ... and the kept ones are the dense weights renormalised: w' = w * (w - lam) / (w - lam + eps)
  # / sum, so every nonzero weight is >= its dense value (> lam) up to the eps factor, which is
  # at least 1 - 1e-3 for float32 gaps above lam.
  assert np.all(weights[weights > 0] >= lam * (1 - 1e-3))
  kept = np.where(dense > lam, dense, 0.0)
  np.testing.assert_allclose(weights, kept / kept.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(read), _np_assemble(weights @ memory, f.shape, rates), rtol=1e-5, atol=1e-5
  )


@given(st.sampled_from(_CASES), st.integers(0, 2**31 - 1))
def test_block_equal_to_an_orthogonal_item_reads_that_item(case, seed):
  """A block that is (a positive multiple of) item j reads back exactly item j.

  With mutually orthogonal items, cos(q, m_j) = 1 and cos(q, m_i) = 0 for i != j, so
  w_j = e / (e + N - 1) and w_i = 1 / (e + N - 1). Since e > 1, w_i < 1/N < w_j for every
  N >= 2: shrinkage at 1/N keeps item j alone, its renormalised weight is 1 and the read is m_j.
  """
  batch, rates, block, num_items = case
  dim = int(np.prod(block))
  num_items = min(num_items, dim)  # orthogonality needs N <= D; every case keeps N >= 2
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  memory = (basis[:num_items] * rng.uniform(0.5, 2.0, size=(num_items, 1))).astype(np.float32)
  chosen = rng.integers(0, num_items, size=(batch, *rates))
  scale = rng.uniform(0.1, 10.0, size=(batch, *rates, 1))
  shape = (batch, *(r * b for r, b in zip(rates, block, strict=True)))
  f = _np_assemble((memory[chosen] * scale).astype(np.float32), shape, rates)

  e = np.e
  assert 1 / (e + num_items - 1) < 1 / num_items < e / (e + num_items - 1)
  read, weights = _read(jnp.asarray(f), jnp.asarray(memory), rates=rates)
  np.testing.assert_allclose(
    np.asarray(weights), np.eye(num_items)[chosen], atol=1e-5
  )  # one-hot on item j
  np.testing.assert_allclose(
    np.asarray(read), _np_assemble(memory[chosen], shape, rates), atol=1e-5
  )


def _per_pixel_read(f, memory, lam, eps=1e-12):
  """Direct per-pixel MemAE / MNAD read: query = the C-vector at each pixel."""
  unit = lambda x: x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
  w = jax.nn.softmax(jnp.einsum("bhwc,nc->bhwn", unit(f), unit(memory)), axis=-1)
  w = jax.nn.relu(w - lam) * w / (jnp.abs(w - lam) + eps)
  w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), eps)
  return jnp.einsum("bhwn,nc->bhwc", w, memory), w


def test_per_pixel_read_is_the_rates_hw1_special_case():
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(2, 4, 5, 6)), jnp.float32)
  memory = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
  read, weights = _read(f, memory, rates=(4, 5, 1))
  read_ref, weights_ref = jax.jit(_per_pixel_read)(f, memory, 1 / 9)
  assert weights.shape == (2, 4, 5, 1, 9)
  np.testing.assert_allclose(np.asarray(weights[:, :, :, 0]), weights_ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(read), read_ref, atol=1e-5)


def test_rates_111_is_one_query_per_image():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
  memory = rng.normal(size=(5, 24)).astype(np.float32)
  _, weights = mem.block_memory_read(
    jnp.asarray(f), jnp.asarray(memory), rates=(1, 1, 1), shrink=False
  )
  assert weights.shape == (3, 1, 1, 1, 5)
  expected = _np_softmax_cos(f.reshape(3, -1), memory)  # the whole image, flattened (h, w, c)
  np.testing.assert_allclose(np.asarray(weights).reshape(3, 5), expected, rtol=1e-5)


def test_shape_errors_name_sizes_and_rates():
  f = jnp.zeros((1, 6, 8, 4))
  with pytest.raises(ValueError, match=r"\(6, 8, 4\).*\(4, 2, 1\)"):
    mem.block_memory_read(f, jnp.zeros((3, 6)), rates=(4, 2, 1))
  with pytest.raises(ValueError, match=r"\(6, 8, 4\).*\(2, 2, 3\)"):
    mem.block_memory_read(f, jnp.zeros((3, 6)), rates=(2, 2, 3))
  with pytest.raises(ValueError, match="expected D = 48, got"):
    mem.block_memory_read(f, jnp.zeros((3, 47)), rates=(2, 2, 1))
  with pytest.raises(ValueError, match="rates"):
    mem.block_memory_read(f, jnp.zeros((3, 48)), rates=(2, 2))


def test_zero_inputs_are_safe_and_differentiable():
  memory = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8)), jnp.float32).at[1].set(0.0)
  f = jnp.zeros((1, 2, 2, 2))

  def loss(x, m):
    read, _ = mem.block_memory_read(x, m, rates=(1, 1, 1))
    return jnp.sum(read**2)

  read, weights = mem.block_memory_read(f, memory, rates=(1, 1, 1), shrink=False)
  np.testing.assert_allclose(np.asarray(weights), 0.25, rtol=1e-6)  # all similarities are 0
  g_f, g_m = jax.jit(jax.grad(loss, argnums=(0, 1)))(f, memory)
  assert np.all(np.isfinite(np.asarray(g_f))) and np.all(np.isfinite(np.asarray(g_m)))
  assert np.all(np.isfinite(np.asarray(read)))


def test_memory_init_range():
  m = mem.memory_init(jax.random.key(0), 500, 2048)
  assert m.shape == (500, 2048) and m.dtype == jnp.float32
  bound = 1 / np.sqrt(2048)
  assert float(jnp.max(jnp.abs(m))) <= bound
  np.testing.assert_allclose(float(jnp.std(m)), bound / np.sqrt(3), rtol=0.01)


def test_jit_vmap_grad_compile_once():
  rng = np.random.default_rng(3)
  memory = jnp.asarray(rng.normal(size=(6, 12)), jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(f, m):
    def loss(x, mm):
      read, weights = mem.block_memory_read(x, mm, rates=(2, 2, 1))
      return jnp.mean((read - x) ** 2) + jnp.mean(weights), read

    grads, read = jax.grad(loss, argnums=(0, 1), has_aux=True)(f, m)
    # vmap over a leading "clip" axis, each element being a (B, H, W, C) batch.
    per_clip = jax.vmap(lambda x: mem.block_memory_read(x, m, rates=(2, 2, 1))[0])(f[:, None])
    return grads, read, per_clip

  for _ in range(3):
    f = jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32)
    (g_f, g_m), read, per_clip = step(f, memory)
    assert g_f.shape == f.shape and g_m.shape == memory.shape
    assert float(jnp.sum(jnp.abs(g_m))) > 0
    np.testing.assert_allclose(np.asarray(per_clip[:, 0]), np.asarray(read), atol=1e-6)


def test_hard_shrink_equals_the_memae_formula_and_its_gradient():
  w = jax.nn.softmax(jnp.asarray(np.random.default_rng(4).normal(size=(16, 7)), jnp.float32))
  lam, eps = 1 / 7, 1e-12

  def memae(x):  # the literal MemAE expression
    kept = jax.nn.relu(x - lam) * x / (jnp.abs(x - lam) + eps)
    return kept / jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), eps)

  np.testing.assert_allclose(mem.hard_shrink(w, lam), memae(w), rtol=1e-6, atol=1e-7)
  upstream = jnp.linspace(-1.0, 1.0, w.size).reshape(w.shape)
  grad = lambda fn: jax.grad(lambda x: jnp.sum(fn(x) * upstream))(w)
  np.testing.assert_allclose(grad(lambda x: mem.hard_shrink(x, lam)), grad(memae), atol=1e-5)
