"""Tests for the linen BlockMemory wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmad_jax.nn.memory import BlockMemory
from dmad_jax.ops import memory as mem


@pytest.mark.parametrize(
  ("shape", "rates", "dim"),
  [
    ((2, 8, 8, 4), (4, 4, 1), 16),  # DAAD-style 2x2 blocks
    ((1, 4, 6, 3), (4, 6, 1), 3),  # per-pixel MemAE / MNAD read
    ((2, 2, 2, 6), (1, 1, 2), 12),  # image-level read split over channels
  ],
)
def test_init_infers_the_query_width(shape, rates, dim):
  module = BlockMemory(num_items=10, rates=rates)
  params = module.init(jax.random.key(0), jnp.zeros(shape))
  assert jax.tree.map(jnp.shape, params) == {"params": {"memory": (10, dim)}}
  # U(-1/sqrt(D), 1/sqrt(D)): bounded and, with >= 30 draws, reaching close to the bound.
  max_abs = float(jnp.max(jnp.abs(params["params"]["memory"])))
  assert 0.8 / np.sqrt(dim) < max_abs <= 1 / np.sqrt(dim)


@pytest.mark.parametrize("shrink", [True, False])
def test_apply_equals_the_op_with_the_same_params(shrink):
  module = BlockMemory(num_items=7, rates=(2, 2, 1), shrink=shrink, shrink_threshold=0.1)
  f = jax.random.normal(jax.random.key(1), (2, 4, 6, 3))
  params = module.init(jax.random.key(0), f)
  read, weights = jax.jit(module.apply)(params, f)
  read_ref, weights_ref = mem.block_memory_read(
    f, params["params"]["memory"], rates=(2, 2, 1), shrink=shrink, shrink_threshold=0.1
  )
  assert read.shape == f.shape and weights.shape == (2, 2, 2, 1, 7)
  np.testing.assert_allclose(read, read_ref, atol=1e-6)
  np.testing.assert_allclose(weights, weights_ref, atol=1e-6)


def test_non_divisible_input_raises():
  with pytest.raises(ValueError, match=r"\(5, 4, 3\).*\(2, 2, 1\)"):
    BlockMemory(num_items=4, rates=(2, 2, 1)).init(jax.random.key(0), jnp.zeros((1, 5, 4, 3)))
