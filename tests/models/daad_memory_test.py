"""DAAD's memory reads inside the model: item recall and the image-level (r_h = r_w = 1) read."""

import jax
import jax.numpy as jnp
import numpy as np

from dmad_jax.models import daad
from dmad_jax.nn.memory import BlockMemory


def _blocks(x, rates):
  """(B, H, W, C) -> (B, r_h, r_w, r_c, D), blocks flattened (h, w, c) row-major."""
  b, h, w, c = x.shape
  r_h, r_w, r_c = rates
  x = x.reshape(b, r_h, h // r_h, r_w, w // r_w, r_c, c // r_c).transpose(0, 1, 3, 5, 2, 4, 6)
  return x.reshape(b, r_h, r_w, r_c, -1)


def _assemble(blocks, shape, rates):
  b, h, w, c = shape
  r_h, r_w, r_c = rates
  x = blocks.reshape(b, r_h, r_w, r_c, h // r_h, w // r_w, c // r_c).transpose(0, 1, 4, 2, 5, 3, 6)
  return x.reshape(shape)


def test_block_equal_to_a_memory_item_reads_that_item():
  """Every block set to (a positive multiple of) an item of a freshly initialised DAAD bank
  (N = 500, rates 8x8x1) reads back exactly that item under a sharp softmax; with the paper's
  temperature 1 the same read mixes many items (why DAAD needs learned, distinct items)."""
  rates, shape, num_items = (8, 8, 1), (2, 16, 16, 8), 500
  sharp = BlockMemory(num_items=num_items, rates=rates, temperature=0.01)
  variables = sharp.init(jax.random.key(0), jnp.zeros(shape))
  memory = np.asarray(variables["params"]["memory"])
  assert memory.shape == (num_items, 2 * 2 * 8)
  rng = np.random.default_rng(0)
  chosen = rng.integers(0, num_items, size=(2, 8, 8, 1))
  scale = rng.uniform(0.1, 10.0, size=(2, 8, 8, 1, 1))  # cosine addressing ignores the norm
  f = _assemble(memory[chosen] * scale, shape, rates).astype(np.float32)

  read, weights = sharp.apply(variables, jnp.asarray(f))
  np.testing.assert_array_equal(np.argmax(np.asarray(weights), -1), chosen)
  np.testing.assert_allclose(np.asarray(weights).max(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(read), _assemble(memory[chosen], shape, rates), rtol=1e-5, atol=1e-6
  )

  paper = BlockMemory(num_items=num_items, rates=rates)  # temperature 1 (Eq. 1)
  read_t1, weights_t1 = paper.apply(variables, jnp.asarray(f))
  assert float(jnp.mean(jnp.sum(weights_t1 > 0, -1))) > 50
  assert not np.allclose(np.asarray(read_t1), _assemble(memory[chosen], shape, rates), atol=1e-3)


def test_rates_one_reads_whole_feature_maps():
  """With r_h = r_w = r_c = 1 each level's query is the whole (H_l, W_l, C_l) map: one
  addressing per image and level, and the read is a mixture of whole-map items."""
  model = daad.DAAD(
    channels=(4, 8),
    bottleneck=8,
    out_channels=1,
    memory_levels=(1, 2),
    rates=(1, 1, 1),
    num_items=6,
    shrink=False,
  )
  x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 1), minval=-1, maxval=1)
  # Shapes only (no compilation): the level maps are 8x8x4 and 4x4x8.
  variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(1), x)
  mem = variables["params"]
  assert mem["memory1"]["memory"].shape == (6, 8 * 8 * 4)
  assert mem["memory2"]["memory"].shape == (6, 4 * 4 * 8)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert out["weights"][1].shape == (3, 1, 1, 1, 6) and out["weights"][2].shape == (3, 1, 1, 1, 6)

  # The level-1 read (the module DAAD uses, same settings) is the weight-mixture of the
  # reshaped items ...
  f = jax.random.uniform(jax.random.key(2), (3, 8, 8, 4))
  block = BlockMemory(num_items=6, rates=(1, 1, 1), shrink=False)
  params = block.init(jax.random.key(3), f)
  read, w = block.apply(params, f)
  items = np.asarray(params["params"]["memory"]).reshape(6, 8, 8, 4)
  np.testing.assert_allclose(
    np.asarray(read), np.einsum("bn,nhwc->bhwc", np.asarray(w).reshape(3, 6), items), atol=1e-6
  )
  # ... so a change of one corner pixel of the map changes the read at the opposite corner.
  read2, _ = block.apply(params, f.at[:, 0, 0, :].add(5.0))
  assert np.all(np.abs(np.asarray(read2 - read)[:, -1, -1, :]) > 0)
