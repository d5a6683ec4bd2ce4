"""dmad_jax.nn.precision and the precision-sensitive ops with bfloat16 inputs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmad_jax.nn import precision
from dmad_jax.ops import sampling


def test_compute_dtype_reads_the_config_and_refuses_unknown_names():
  c = ml_collections.ConfigDict()
  assert precision.compute_dtype(c) == jnp.float32  # a config without the key
  c.compute_dtype = "bfloat16"
  assert precision.compute_dtype(c) == jnp.bfloat16
  c.compute_dtype = "float16"
  with pytest.raises(ValueError, match=r"compute_dtype must be one of float32, bfloat16.*float16"):
    precision.compute_dtype(c)


def test_cast_floating_casts_floating_arrays_only():
  tree = {
    "w": jnp.ones((2,), jnp.float32),
    "i": jnp.arange(3),
    "b": np.array([True]),
    "n": np.ones(2, np.float64),
    "flag": True,
    "name": "x",
  }
  out = precision.cast_floating(tree, jnp.bfloat16)
  assert out["w"].dtype == jnp.bfloat16 and out["n"].dtype == jnp.bfloat16
  assert out["i"].dtype == tree["i"].dtype and out["b"].dtype == np.bool_
  assert out["flag"] is True and out["name"] == "x"
  same = precision.cast_floating(tree, jnp.float32)
  assert same["w"] is tree["w"]  # nothing to cast: the same array


def test_for_compute_casts_the_params_collection_only():
  v = {"params": {"k": jnp.ones(2)}, "batch_stats": {"mean": jnp.ones(2)}}
  out = precision.for_compute(v, jnp.bfloat16)
  assert out["params"]["k"].dtype == jnp.bfloat16
  assert out["batch_stats"]["mean"].dtype == jnp.float32


def _sample_inputs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 16, 8)).astype(np.float32)
  grid = rng.uniform(-1.1, 1.1, size=(2, 12, 12, 2)).astype(np.float32)
  return jnp.asarray(x).astype(jnp.bfloat16), jnp.asarray(grid)


def test_grid_sample_of_bfloat16_images_accumulates_in_float32():
  """bfloat16 samples are the float32 samples of the same (bf16-valued) image rounded once:
  the four-corner sum and both gradients' accumulations run in float32."""
  x16, grid = _sample_inputs()
  out16 = sampling.grid_sample(x16, grid)
  out32 = sampling.grid_sample(x16.astype(jnp.float32), grid)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out16), np.asarray(out32.astype(jnp.bfloat16)))

  # A linear loss whose upstream gradient w is exactly a bfloat16 value: both passes then get
  # the same gradient, and the bfloat16 one differs from float32 only by its final rounding.
  w = jnp.asarray(np.random.default_rng(1).normal(size=out32.shape)).astype(jnp.bfloat16)

  def loss(x, g):
    return jnp.sum(sampling.grid_sample(x, g).astype(jnp.float32) * w.astype(jnp.float32))

  gx16, gg16 = jax.grad(loss, argnums=(0, 1))(x16, grid)
  gx32, gg32 = jax.grad(loss, argnums=(0, 1))(x16.astype(jnp.float32), grid)
  assert gx16.dtype == jnp.bfloat16 and gg16.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(gx16), np.asarray(gx32.astype(jnp.bfloat16)))
  np.testing.assert_allclose(np.asarray(gg16), np.asarray(gg32), rtol=1e-6, atol=1e-5)


def test_offsets_to_grid_keeps_coordinates_in_float32():
  offsets = jnp.full((1, 4, 4, 2), 0.013, jnp.bfloat16)
  grid = sampling.offsets_to_grid(offsets, (256, 256))
  assert grid.dtype == jnp.float32
  # identity + offset to float32 precision (the last columns are clamped to the image); in
  # bfloat16 the identity grid alone is off by up to 2^-8, a third of a pixel of this row.
  identity = sampling.identity_grid(1, 256, 256)
  moved = np.asarray(grid - identity)[0, :, :-2, 0]
  np.testing.assert_allclose(moved, float(offsets[0, 0, 0, 0]), atol=1e-6)
  rounding = np.abs(np.asarray(identity.astype(jnp.bfloat16).astype(jnp.float32) - identity))
  assert rounding.max() > 1e-3
